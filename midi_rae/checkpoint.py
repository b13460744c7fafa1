"""Checkpoints that survive a kill and load without running pickled code.

Layout of `<stage>/checkpoints/`:

- `step_00001234/model.safetensors`: every weight of the training module (safetensors), with
  the resolved config as YAML in its metadata.
- `step_00001234/state.pt`: optimizer state, step, epoch, RNG states, best metric and the config
  as a dict, plain tensors and Python values only, read with `torch.load(weights_only=True)`.
- `latest.json`, `best.json`: which step folder is the newest / the best.

A checkpoint folder is written under a temporary name and renamed when complete, and the
pointer files are replaced atomically, so a kill at any moment leaves the previous checkpoint
usable. The newest `keep_last` step folders are kept, plus the best. A step folder that cannot
be read (a truncated file, a disk error) is renamed `step_*.corrupt` when found, never deleted,
and resuming goes on from the newest intact one (`load_latest`).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from midi_rae.utils import atomic_write, atomic_write_text

MODEL_FILE, STATE_FILE = "model.safetensors", "state.pt"


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors file of a state dict, written to a temporary name and renamed."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}  # clone: no shared storage
    umask = os.umask(0)
    os.umask(umask)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~umask)  # readable like any other output file

    atomic_write(path, write)


def read_metadata(path: str | Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{path} is not a safetensors weights file ({e}); give a run folder or its "
                         f"encoder.safetensors / decoder.safetensors") from None


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise a ValueError listing missing, unexpected and shape-mismatched keys, if any."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{what} does not fit the model built from this config:"]
        for title, keys in (("missing in checkpoint", missing), ("unexpected in checkpoint", unexpected),
                            ("shape mismatch", shapes)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        lines.append("  build the model with the config the checkpoint was trained with (its config.yaml)")
        raise ValueError("\n".join(lines))


def load_weights(module: nn.Module, path: str | Path, prefix: str = "",
                 adapt: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> None:
    """Load a safetensors file into `module`, strictly. With `prefix`, only keys starting with it
    are read (e.g. 'encoder.' from a full training checkpoint), with the prefix dropped. `adapt`
    maps the state dict to the module's before the strict load (e.g. weights trained at another
    window size, `swin.resize_position_tables`)."""
    state = load_file(str(path))
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if adapt is not None:
        state = adapt(state)
    check_state_dict(module, state, f"{path}" + (f" ({prefix}*)" if prefix else ""))
    module.load_state_dict(state, strict=True)


def decoder_encoder(decoder_path: Path) -> Path:
    """The encoder a `decoder.safetensors` was trained on: the fine-tuned one beside it, else the
    one its metadata names (which may lie in another run folder, `train-decoder --encoder`)."""
    sibling = decoder_path.with_name("encoder.safetensors")
    if sibling.exists():
        return sibling
    named = read_metadata(decoder_path).get("encoder")
    if not named or not Path(named).is_file():
        raise FileNotFoundError(f"{decoder_path} was trained on the encoder {named or '(not recorded)'}, which is "
                                f"missing: put it back, or train the decoder again with --encoder PATH")
    return Path(named)


# ----------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from, as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64)),
             "numpy_rest": [kind, int(pos), int(has_gauss), float(gauss)], "python": _to_lists(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, pos, has_gauss, gauss = state["numpy_rest"]
    np.random.set_state((kind, state["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


# ----------------------------------------------------------------------------- checkpoints


def step_dir(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step_{step:08d}"


def step_dirs(ckpt_dir: Path) -> list[Path]:
    """The step folders of `ckpt_dir`, oldest first (not the temporary or corrupt ones)."""
    if not ckpt_dir.is_dir():
        return []
    found = [d for d in ckpt_dir.iterdir() if d.is_dir() and re.fullmatch(r"step_\d+", d.name)]
    return sorted(found, key=lambda d: int(d.name[5:]))


def has_checkpoints(ckpt_dir: Path) -> bool:
    """Whether a run wrote checkpoints here, even if its pointer names a folder that is gone."""
    return bool(step_dirs(ckpt_dir)) or (ckpt_dir / "latest.json").exists()


def save_checkpoint(ckpt_dir: Path, step: int, model: nn.Module, state: dict[str, Any], config_yaml: str,
                    keep_last: int, is_best: bool = False) -> Path:
    """Write checkpoint `step` (weights + `state`), point latest (and best) at it, prune old ones."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = step_dir(ckpt_dir, step)
    tmp = ckpt_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(model.state_dict(), tmp / MODEL_FILE, {"config": config_yaml, "step": str(step)})
    torch.save(state, tmp / STATE_FILE)
    if final.exists():  # the same step again (e.g. a periodic and an end-of-epoch save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(ckpt_dir / "latest.json", json.dumps({"step": step, "dir": final.name}) + "\n")
    if is_best:
        atomic_write_text(ckpt_dir / "best.json", json.dumps({"step": step, "dir": final.name}) + "\n")
    _prune(ckpt_dir, keep_last)
    return final


def _pointer(ckpt_dir: Path, name: str) -> Path | None:
    p = ckpt_dir / f"{name}.json"
    return ckpt_dir / json.loads(p.read_text())["dir"] if p.exists() else None


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    keep = {_pointer(ckpt_dir, "latest"), _pointer(ckpt_dir, "best")}
    steps = step_dirs(ckpt_dir)
    keep |= set(steps[-keep_last:])
    for d in steps:
        if d not in keep:
            shutil.rmtree(d, ignore_errors=True)
    for leftover in ckpt_dir.glob(".step_*.tmp"):  # a save killed half-way
        shutil.rmtree(leftover, ignore_errors=True)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    d = _pointer(ckpt_dir, "latest") if ckpt_dir.exists() else None
    return d if d is not None and d.exists() else None


def best_checkpoint(ckpt_dir: Path) -> Path | None:
    d = _pointer(ckpt_dir, "best") if ckpt_dir.exists() else None
    return d if d is not None and d.exists() else latest_checkpoint(ckpt_dir)


def load_checkpoint(path: Path, model: nn.Module) -> dict[str, Any]:
    """Load a checkpoint folder's weights into `model` (strictly) and return its state dict."""
    load_weights(model, path / MODEL_FILE)
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A step folder's weights and state, or an OSError saying why they cannot be read."""
    try:
        weights = load_file(str(path / MODEL_FILE))
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        step = state["step"]
    except Exception as e:  # safetensors, pickle and zip errors of a truncated file have no common type
        raise OSError(f"{type(e).__name__}: {e}") from None
    if not isinstance(step, int):
        raise OSError(f"{STATE_FILE} holds no step")
    return weights, state


def set_aside(path: Path) -> Path:
    """Rename an unreadable step folder to `<name>.corrupt` (`.corrupt2`, ... if taken): kept for
    inspection, out of the way of listing, pruning and a new save of the same step."""
    for n in range(1, 1000):
        dest = path.with_name(f"{path.name}.corrupt{n if n > 1 else ''}")
        if not dest.exists():
            os.replace(path, dest)
            return dest
    raise FileExistsError(f"too many corrupt copies of {path}")


def load_latest(ckpt_dir: Path, model: nn.Module) -> tuple[Path, dict[str, Any], list[str]] | None:
    """Load the newest readable checkpoint into `model`: the folder `latest.json` names, else the
    step folders newest first. Unreadable ones are set aside. Returns (folder, state, notes on
    what was skipped) or None when there is no step folder at all. A checkpoint that reads but
    does not fit the model is an error (a config change), not corruption: nothing is renamed."""
    notes: list[str] = []
    try:
        pointed = _pointer(ckpt_dir, "latest")
    except (OSError, ValueError, KeyError):
        pointed, notes = None, [f"{ckpt_dir / 'latest.json'} is unreadable; using the step folders"]
    if pointed is not None and not pointed.is_dir():
        notes.append(f"latest.json names {pointed.name}, which is missing")
    for path in reversed(step_dirs(ckpt_dir)):
        try:
            weights, state = _read(path)
        except OSError as e:
            notes.append(f"{path.name} is unreadable ({e}); set aside as {set_aside(path).name}")
            continue
        check_state_dict(model, weights, str(path / MODEL_FILE))
        model.load_state_dict(weights, strict=True)
        if pointed is not None and path != pointed and pointed.is_dir():
            notes.append(f"{path.name} is newer than {pointed.name}, which latest.json names")
        return path, state, notes
    if notes:
        raise FileNotFoundError(f"no readable checkpoint in {ckpt_dir} ({'; '.join(notes)}); start a new run name, "
                                f"or move the folder away to start this one afresh")
    return None
