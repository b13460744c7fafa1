"""The training engine: one `train_one_epoch` for every stage, evaluation, and the pieces they
share (parameter groups, the learning-rate and EMA-momentum schedules).

Kept free of files and process groups except for one all-reduce of the loss: the loop
(`trainer.Trainer`) owns run folders, checkpoints and logging, and reaches in through `on_step`.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from midi_rae.config import TrainConfig
from midi_rae.losses import recon_bce
from midi_rae.metrics import THRESHOLDS, MaskedPatchMeter, PixelMeter, best_f1, inside_piece, scores, threshold_sweep
from midi_rae.utils import submodule_no_weight_decay

class NonFiniteLoss(RuntimeError):
    pass


def layer_decay_scales(model: nn.Module, layer_decay: float) -> dict[str, float]:
    """Learning-rate factor of every parameter of the submodules that declare `layer_ids()` (the
    encoders): `layer_decay ** (top - id)`, where `top` is the id of the encoder's final norm, one
    past its last block. So the heads above the encoder (not named here: factor 1) and the final
    norm train at the full rate, and each block down to the patch embedding at `layer_decay` times
    the rate of the one above it (BEiT, https://arxiv.org/abs/2106.08254)."""
    scales = {}
    for prefix, m in model.named_modules():
        if hasattr(m, "layer_ids"):
            ids = m.layer_ids()
            top = max(ids.values())
            scales.update({f"{prefix}.{name}" if prefix else name: layer_decay ** (top - i) for name, i in ids.items()})
    return scales


def param_groups(model: nn.Module, weight_decay: float, lr_scales: dict[str, float] | None = None,
                 layer_decay: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups: no decay on 1-D parameters (norms, biases) and on what the models name in
    their `no_weight_decay()` (timm's convention). `lr_scales` maps a name prefix (e.g. 'encoder.')
    to a learning-rate factor; `layer_decay` multiplies it by `layer_decay_scales`. Each group's
    factor is its `lr_scale`, which the schedule multiplies; frozen parameters are left out."""
    skip = submodule_no_weight_decay(model) | (model.no_weight_decay() if hasattr(model, "no_weight_decay") else set())
    depth_scales = layer_decay_scales(model, layer_decay) if layer_decay is not None else {}
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and name not in skip
        scale = next((s for prefix, s in (lr_scales or {}).items() if name.startswith(prefix)), 1.0)
        scale *= depth_scales.get(name, 1.0)
        groups.setdefault((decay, scale), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
            for (decay, scale), ps in sorted(groups.items())]


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up to `lr`, then half-cosine decay to `min_lr` at `total_steps` (MAE's schedule, per step)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def momentum_at(step: int, total_steps: int, start: float, end: float) -> float:
    """EMA teacher momentum, rising from `start` to `end` along a half cosine (BYOL, https://arxiv.org/abs/2006.07733)."""
    return end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * min(step / max(1, total_steps), 1.0)))


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when asked; nothing on CPU."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _mean_over_ranks(t: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *, step: int,
                    total_steps: int, cfg: TrainConfig, device: torch.device, epoch: int,
                    update_teacher: Callable[[int], None] | None = None,
                    on_step: Callable[[int, dict[str, float]], None] | None = None,
                    progress: bool = False, initial: int = 0, steps_in_epoch: int | None = None) -> dict[str, Any]:
    """Train until the loader ends or `total_steps` is reached. `model(batch)` returns
    `(loss, parts)`. The learning rate is set before every step; after it, `update_teacher(step)`
    and `on_step(step, stats)` run (logging, validation, checkpoints). Returns the epoch's mean
    loss and parts, and the step reached."""
    model.train()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sums: dict[str, float] = {}
    n, t0 = 0, time.time()
    bar = tqdm(loader, desc=f"epoch {epoch}", initial=initial, total=steps_in_epoch, disable=not progress,
               dynamic_ncols=True, leave=False)
    smooth = None
    for batch in bar:
        if step >= total_steps:
            break
        lr = lr_at(step, total_steps, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        batch = to_device(batch, device)
        with autocast(device, cfg.amp):
            loss, parts = model(batch)
        logged = _mean_over_ranks(torch.stack([loss.detach().float(), *(v.detach().float() for v in parts.values())]))
        loss_value = float(logged[0])
        if not math.isfinite(loss_value):
            detail = ", ".join(f"{k}={float(v):.4g}" for k, v in zip(parts, logged[1:]))
            raise NonFiniteLoss(f"loss is {loss_value} at step {step} (epoch {epoch}; {detail}); stopping")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = cfg.clip_grad if cfg.clip_grad is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        optimizer.step()
        step += 1
        if update_teacher is not None:
            update_teacher(step)
        stats = {"loss": loss_value, **{k: float(v) for k, v in zip(parts, logged[1:])}, "lr": lr, "grad_norm": grad_norm}
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
        smooth = loss_value if smooth is None else 0.9 * smooth + 0.1 * loss_value
        bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{lr:.2e}")
        if on_step is not None:
            on_step(step, stats)
    bar.close()
    out = {k: v / max(n, 1) for k, v in sums.items()}
    out.update(step=step, steps=n, seconds=time.time() - t0)
    return out


@contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """The CPU generator and `device`'s own seeded with `seed` inside, both as they were afterwards:
    evaluation draws the same masks, drop paths and projections every time, and the training
    stream goes on as if it had not run. (`torch.manual_seed` reseeds every CUDA device, while
    `fork_rng(devices=[])` restores the CPU generator only: every evaluation period would then
    replay the same GPU draws.)"""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for d in cuda:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)  # this device only
        yield


@torch.no_grad()
def evaluate_pretrain(model: nn.Module, loader: Iterable, device: torch.device, seed: int = 0,
                      amp: bool = False) -> dict[str, float]:
    """Validation of a `Pretrainer`: the objective's loss, and, when it reconstructs masked
    patches (`model.fixed_mask_reconstruction`), each sample's own masked patches scored
    (P / R / F1 per sample at 0.5, frame channel, inside the piece; `MaskedPatchMeter`). The masks come from a fixed seed, so every validation sees
    the same ones; the training RNG is left untouched."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    meter = MaskedPatchMeter(0.5)
    with seeded_rng(seed, device):
        g = torch.Generator().manual_seed(seed)
        for batch in loader:
            batch = to_device(batch, device)
            x = batch["x"]
            with autocast(device, amp):
                loss, parts = model(batch)
                recon = model.fixed_mask_reconstruction(x, g)
                if recon is not None:
                    inside = inside_piece(batch["start"], batch["steps"], x.shape[-1]).to(x.device)  # (B, 1, 1, W)
                    meter.update(recon.logits.sigmoid(), x, recon.visible, recon.patch_size, inside)
                    parts = dict(parts, recon_fixed_mask=recon.loss)
            b = x.shape[0]
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * b
            n += b
    model.train(was_training)
    out = {k: v / max(n, 1) for k, v in sums.items()}
    if meter.per_sample:
        out.update(meter.compute())
    return out


@torch.no_grad()
def best_threshold(model: nn.Module, loader: Iterable, device: torch.device | str) -> float:
    """The threshold of `THRESHOLDS` with the best frame-channel pixel F1 (columns inside the
    piece) of a `DecoderTrainer` over `loader`: give it training crops, so that the threshold
    reported with a validation metric was not fitted to the validation set."""
    sweep = torch.zeros(len(THRESHOLDS), 4, dtype=torch.float64)
    for batch in loader:
        x = batch["x"].to(device)  # (B, C, 128, W)
        probs = model.logits(x).sigmoid().float()
        inside = inside_piece(batch["start"], batch["steps"], x.shape[-1]).to(device)  # (B, 1, 1, W)
        sweep += threshold_sweep(probs[:, :1], x[:, :1], THRESHOLDS, inside).cpu()
    return best_f1(sweep, THRESHOLDS)[0]


@torch.no_grad()
def evaluate_decoder(model: nn.Module, loader: Iterable, device: torch.device, threshold: float,
                     amp: bool = False) -> dict[str, float]:
    """Validation of a `DecoderTrainer`: BCE (every channel and column) and pixel precision /
    recall / specificity / F1 at `threshold` of the frame channel inside the piece, summed over
    the validation set: the same pixel metrics as `midi-rae eval`."""
    was_training = model.training
    model.eval()
    meter = PixelMeter(threshold)
    total, n = 0.0, 0
    for batch in loader:
        x = batch["x"].to(device)
        with autocast(device, amp):
            logits = model.logits(x).float()
        total += float(recon_bce(logits, x)) * x.shape[0]
        n += x.shape[0]
        inside = inside_piece(batch["start"], batch["steps"], x.shape[-1]).to(device)  # (B, 1, 1, W)
        meter.update(logits[:, :1].sigmoid(), x[:, :1], inside)
    model.train(was_training)
    return {"loss": total / max(n, 1), **meter.compute()}


@torch.no_grad()
def classify(model: nn.Module, loader: Iterable, device: torch.device, amp: bool = False) -> tuple[Tensor, Tensor, float]:
    """A `Classifier` over `loader`: (predicted classes (N,), true classes (N,), mean cross-entropy
    without label smoothing, so that it reads the same whatever smoothing the training used)."""
    was_training = model.training
    model.eval()
    preds, trues, total = [], [], 0.0
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, amp):
            logits = model.logits(batch["x"]).float()  # (B, classes)
        total += float(F.cross_entropy(logits, batch["y"], reduction="sum"))
        preds.append(logits.argmax(1).cpu())
        trues.append(batch["y"].cpu())
    model.train(was_training)
    true = torch.cat(trues)
    return torch.cat(preds), true, total / max(len(true), 1)


def evaluate_classifier(model: nn.Module, loader: Iterable, device: torch.device, amp: bool = False) -> dict[str, float]:
    """Validation of a `Classifier`: loss, accuracy and balanced accuracy."""
    pred, true, loss = classify(model, loader, device, amp)
    return {"loss": loss, **scores(pred, true)}
