"""Small helpers used across the package."""
import errno
import filecmp
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn


def check_output(path: str | os.PathLike) -> Path:
    """`path` as a Path, or an OSError naming it when no file can be written there: a folder is
    in the way, or its parent folder does not exist. Commands call it before long work."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder", str(path.parent))
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], keep_same: bool = False) -> Path:
    """Write `path` by calling `write(tmp)` on a temporary name beside it, then renaming: a crash
    never leaves a half-written file, and a file already there stays whole until the rename.
    The temporary name `.<name>.<pid>.tmp` is unique per process, and removed if `write` fails.
    `keep_same`: a file already there with the same bytes is left untouched (not even its mtime)."""
    path = check_output(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if not (keep_same and path.exists() and filecmp.cmp(tmp, path, shallow=False)):
            os.replace(tmp, path)
    except OSError as e:
        if e.filename == str(tmp):  # name the file the caller asked for (disk full, ...), not ours
            e.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def submodule_no_weight_decay(module: nn.Module) -> set[str]:
    """Names (relative to `module`) of the parameters that its submodules exclude from weight
    decay through their own `no_weight_decay()` (timm's convention)."""
    names = set()
    for prefix, m in module.named_modules():
        if prefix and hasattr(m, "no_weight_decay"):
            names |= {f"{prefix}.{n}" for n in m.no_weight_decay()}
    return names


def resolve_device(name: str) -> torch.device:
    """The torch device of a `--device` option, or a ValueError saying what to use instead."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible; use --device cuda:0")
    return device


def init_linears(model: nn.Module, kinds: tuple[type[nn.Module], ...] = (nn.Linear,), std: float = 0.02) -> None:
    """timm / MAE init: truncated-normal weights (std 0.02) and zero biases for every module of
    `kinds` in `model`, in module order."""
    for m in model.modules():
        if isinstance(m, kinds):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def param_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) number of parameters of `model`."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def check_positive(who: str, **sizes: float | Sequence[float]) -> None:
    """Raise a ValueError naming the argument unless every size (a number, or each of a sequence)
    is positive: a zero or negative one builds, or fails later as torch's own error."""
    for name, value in sizes.items():
        if not all(v > 0 for v in (value if isinstance(value, Sequence) else [value])):
            raise ValueError(f"{who}: {name} must be positive{' (every entry)' if isinstance(value, Sequence) else ''}, "
                             f"got {value}")


def check_rates(who: str, **rates: float) -> None:
    """Raise a ValueError naming the argument unless every rate (a dropout, stochastic-depth or
    masking probability) is in [0, 1): a negative dropout rate builds and is silently read as 0."""
    for name, value in rates.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{who}: {name} must be in [0, 1), got {value}")


def check_roll(x: Tensor, in_chans: int, img_size: tuple[int, int], who: str, dtype: torch.dtype) -> None:
    """Raise a ValueError that says what to change unless x is a (B, in_chans, *img_size) float tensor
    of `dtype`, the model's weights' (under autocast, any float that autocast casts)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{who} expects a torch.Tensor piano roll, got {type(x).__name__}; use torch.as_tensor(x).float()")
    if not x.is_floating_point():  # a cache's uint8 roll or a bool mask reach the convolution as torch's own error
        raise ValueError(f"{who} expects a float piano roll in [0, 1], got dtype {x.dtype}; pass x.float() "
                         f"(a velocity roll: x.float() / 127)")
    # Refused, not converted, as torch's own modules do and as the dtypes above are: a float64 roll
    # (numpy's default) is most often a float32 one by mistake, and a silent cast would hide it.
    # Autocast casts a float16, bfloat16 or float32 roll itself, never a float64 one.
    if x.dtype != dtype and (x.dtype == torch.float64 or not torch.is_autocast_enabled(x.device.type)):
        raise ValueError(f"{who} has {dtype} weights but got a {x.dtype} piano roll; pass x.to({dtype})")
    if x.dim() != 4:
        hint = "; add the channel axis with x.unsqueeze(1)" if x.dim() == 3 else ""
        raise ValueError(f"{who} expects a (B, C, H, W) piano roll, got shape {tuple(x.shape)}{hint}")
    if x.shape[1] != in_chans:
        raise ValueError(f"input has {x.shape[1]} channels but {who} was built with in_chans={in_chans}; "
                         f"build it with in_chans={x.shape[1]} or select the channels it expects")
    if tuple(x.shape[2:]) != tuple(img_size):
        raise ValueError(f"input is {x.shape[2]}x{x.shape[3]} but {who} was built for {img_size[0]}x{img_size[1]}; "
                         f"crop the roll or build with img_height={x.shape[2]}, img_width={x.shape[3]}")
