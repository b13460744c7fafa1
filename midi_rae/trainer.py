"""The training loop of one stage: `Trainer` runs `engine.train_one_epoch` epoch after epoch,
validates, logs and writes checkpoints, and resumes from one exactly (the same batches and the
same random draws as the interrupted run). The stages (`midi_rae.stages`) build its model and data.

Rank 0 alone validates, logs and writes checkpoints; every process takes part in a checkpoint
(its RNG state is saved) and in the check, at the end, that all hold the same weights.
"""
from __future__ import annotations

import hashlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from midi_rae.checkpoint import has_checkpoints, load_latest, rng_state, save_checkpoint, set_rng_state
from midi_rae.config import Config, ConfigError, TrainConfig
from midi_rae.dataset import PianoRollDataset
from midi_rae.distributed import Dist, all_gather, barrier, say
from midi_rae.engine import NonFiniteLoss, momentum_at, param_groups, train_one_epoch
from midi_rae.logger import Logger
from midi_rae.utils import atomic_write_text, param_count

# The config section that holds each stage's training settings.
SECTIONS = {"pretrain": "train", "decoder": "decoder_train", "finetune": "finetune_train"}

# Fields that may differ between a run and its resumption: they do not change the result.
RESUMABLE_CHANGES = (*(f"{s}.{k}" for s in SECTIONS.values() for k in ("progress", "tensorboard", "wandb")),
                     "data.num_workers", "model.grad_checkpointing")
# Fields that change the result from the resumed step on, and that the advice after a non-finite
# loss asks for: allowed on resume, and named in the log.
TUNABLE_ON_RESUME = ("lr", "min_lr", "warmup_steps", "clip_grad", "amp")
# Sections a stage never reads: pretraining may resume after the later stages' settings changed
# (a preset's decoder budget edited while its pretraining was stopped), and says nothing of them.
UNREAD_BY_STAGE = {"pretrain": ("decoder.", "decoder_train.", "finetune.", "finetune_train.")}


# ----------------------------------------------------------------------------- batches


def steps_per_epoch(ds: PianoRollDataset, tcfg: TrainConfig, d: Dist) -> int:
    spe = len(ds) // (tcfg.batch_size * d.world)
    if spe == 0:
        raise ConfigError(f"the training set has {len(ds)} crops, fewer than one global batch of "
                          f"{tcfg.batch_size} x {d.world} processes; lower train.batch_size")
    return spe


def epoch_loader(ds: PianoRollDataset, tcfg: TrainConfig, d: Dist, epoch: int, skip: int, spe: int,
                 num_workers: int) -> DataLoader:
    """This process's batches of `epoch`, from batch `skip` on: the order depends on (seed, epoch)
    only, so a resumed run sees exactly the batches the interrupted one would have seen."""
    ds.set_epoch(epoch)
    sampler = DistributedSampler(ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=tcfg.seed, drop_last=True)
    sampler.set_epoch(epoch)
    indices = list(sampler)[: spe * tcfg.batch_size][skip * tcfg.batch_size:]
    return DataLoader(ds, batch_size=tcfg.batch_size, sampler=indices, num_workers=num_workers, drop_last=True,
                      generator=torch.Generator().manual_seed(tcfg.seed + epoch),  # keeps the global RNG untouched
                      pin_memory=d.device.type == "cuda")


def val_loader(val: Subset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(val, batch_size=batch_size, shuffle=False, num_workers=num_workers)


# ----------------------------------------------------------------------------- resuming and the final check


def config_diff(a: dict, b: dict, prefix: str = "", allowed: tuple[str, ...] = RESUMABLE_CHANGES,
                defaults: dict | None = None) -> list[str]:
    """`key: checkpoint A, now B` for each field that differs, except those under `allowed`. A
    field missing from the checkpoint's config A (added to the package since) counts as its default."""
    defaults = Config().to_dict() if defaults is None else defaults
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, defaults.get(k)), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{k}.", allowed, defaults.get(k) or {})
        elif va != vb and not any(f"{prefix}{k}".startswith(r) for r in allowed):
            out.append(f"{prefix}{k}: checkpoint {va!r}, now {vb!r}")
    return out


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- the loop


class Trainer:
    """Trains `model` (a Pretrainer or DecoderTrainer) for the stage `stage` ('pretrain',
    'decoder') of `cfg` on `train_ds`, validating on `val` with `evaluate(model, loader)` and
    keeping the checkpoint with the best `best_key` (lowest for 'loss', else highest).
    `lr_scales` maps parameter-name prefixes to learning-rate factors; `teacher_momentum`
    (start, end) moves an EMA teacher (`model.update_teacher`) after every step."""

    def __init__(self, stage: str, cfg: Config, model: nn.Module, d: Dist, stage_dir: Path, train_ds: PianoRollDataset,
                 val: Subset, evaluate: Callable[[nn.Module, DataLoader], dict[str, float]], best_key: str,
                 resume: bool = False, lr_scales: dict[str, float] | None = None,
                 teacher_momentum: tuple[float, float] | None = None) -> None:
        self.stage, self.section, self.cfg, self.d, self.stage_dir = stage, SECTIONS[stage], cfg, d, stage_dir
        self.tcfg = tcfg = getattr(cfg, self.section)
        self.ckpt_dir = stage_dir / "checkpoints"
        if has_checkpoints(self.ckpt_dir) and not resume:
            raise ConfigError(f"{stage_dir} already holds checkpoints: pass --resume to continue that run, "
                              f"or choose another run name (name=...)")
        self.train_ds, self.val, self.evaluate, self.best_key = train_ds, val, evaluate, best_key
        self.teacher_momentum = teacher_momentum
        self.spe = steps_per_epoch(train_ds, tcfg, d)
        self.total = tcfg.max_steps or tcfg.epochs * self.spe
        # Fused: one kernel per parameter, where torch's CPU default loops a dozen small ops over each.
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters())
        self.optimizer = torch.optim.AdamW(param_groups(model, tcfg.weight_decay, lr_scales, tcfg.layer_decay),
                                           lr=tcfg.lr, betas=tuple(tcfg.betas), fused=fused)
        self.config_yaml = cfg.to_yaml()
        self.raw = model  # what is validated, saved and digested; `self.model` may wrap it
        self.step: int = 0
        self.best: float | None = None
        self.best_step: int | None = None
        if resume:
            self._resume()
        if d.main:
            stage_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(stage_dir / "config.yaml", self.config_yaml)
        if tcfg.compile:
            model = torch.compile(model)
        if d.world > 1:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                                        find_unused_parameters=True)
        self.model = model
        self.log = Logger(stage_dir, cfg, stage, self.section, d.main, self.step)
        self.vloader = val_loader(val, tcfg.batch_size, cfg.data.num_workers)
        self.last_val: dict[str, float] = {}
        self.acc: dict[str, float] = {}  # sums of the training stats since the last train log line
        self.saved_at = self.evaluated_at = -1

    def _resume(self) -> None:
        """Model, optimizer, step, best and RNG states from the latest readable checkpoint, if any.
        Rank 0 looks first: it alone sets unreadable checkpoints aside, the others then skip them."""
        d, stage = self.d, self.stage
        found = load_latest(self.ckpt_dir, self.raw) if d.main else None
        barrier(d)
        found = found if d.main else load_latest(self.ckpt_dir, self.raw)
        if found is None:
            return
        latest, state, notes = found
        for note in notes:
            say(d, f"[{stage}] {note}; resuming from {latest.name}")
        tunable = tuple(f"{self.section}.{k}" for k in TUNABLE_ON_RESUME)
        unread = UNREAD_BY_STAGE.get(stage, ())
        diff = config_diff(state["config"], self.cfg.to_dict(), allowed=RESUMABLE_CHANGES + unread)  # ["key: ..."]
        refused = [line for line in diff if not line.startswith(tunable)]
        if refused:
            raise ConfigError(f"--resume: the config differs from the checkpoint's ({latest}):\n  " + "\n  ".join(refused)
                              + f"\nresume with the same config (see its config.yaml; only {', '.join(tunable)} may "
                                f"change), or start a new run name")
        for line in diff:
            say(d, f"[{stage}] changed on resume, from step {state['step']} on: {line}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.best, self.best_step = state["step"], state["best"], state["best_step"]
        rngs = state["rng"]
        set_rng_state(rngs[d.rank] if len(rngs) == d.world else rngs[0])
        say(d, f"[{stage}] resumed from {latest} at step {self.step}")

    def validate(self, step: int) -> None:
        if self.d.main:
            self.last_val = self.evaluate(self.raw, self.vloader)
            value = self.last_val.get(self.best_key)
            higher = self.best_key != "loss"
            if value is not None and math.isfinite(value) and (
                    self.best is None or (value > self.best if higher else value < self.best)):
                self.best, self.best_step = value, step
            self.log.log("val", step, {**self.last_val, "best": self.best, "best_step": self.best_step})
        self.evaluated_at = step

    def checkpoint(self, step: int) -> None:
        rngs = all_gather(self.d, rng_state())
        if self.d.main:
            state = {"stage": self.stage, "step": step, "optimizer": self.optimizer.state_dict(), "rng": rngs,
                     "best": self.best, "best_step": self.best_step, "config": self.cfg.to_dict()}
            save_checkpoint(self.ckpt_dir, step, self.raw, state, self.config_yaml, self.tcfg.keep_last,
                            is_best=self.best_step == step)
        barrier(self.d)
        self.saved_at = step

    def on_step(self, step: int, stats: dict[str, float]) -> None:
        """After every optimizer step (called by `train_one_epoch`): log, validate, save when due."""
        tcfg = self.tcfg
        for k, v in stats.items():
            self.acc[k] = self.acc.get(k, 0.0) + v
        self.acc["_n"] = self.acc.get("_n", 0) + 1
        if step % tcfg.log_every == 0 or step == self.total:
            n = self.acc.pop("_n")
            self.log.log("train", step, {"epoch": (step - 1) // self.spe, **{k: v / n for k, v in self.acc.items()}})
            self.acc.clear()
        # The last step is validated before its checkpoint is written, so that a best last step
        # is saved as the best (best.json, the state's best_step and the log then agree).
        if (tcfg.eval_every and step % tcfg.eval_every == 0) or step == self.total:
            self.validate(step)
        if step % tcfg.ckpt_every == 0:
            self.checkpoint(step)

    def update_teacher(self, step: int) -> None:
        self.raw.update_teacher(momentum_at(step, self.total, *self.teacher_momentum))

    def run(self) -> dict[str, Any]:
        """Train to the last step; returns the final stats (also logged as the 'final' line)."""
        d, stage, tcfg, total, spe = self.d, self.stage, self.tcfg, self.total, self.spe
        if d.main:
            trainable, n_params = param_count(self.raw)
            print(f"[{stage}] {self.stage_dir}: {len(self.train_ds)} training crops, {len(self.val)} validation crops, "
                  f"{spe} steps/epoch, {total} steps, {trainable:,} trainable of {n_params:,} parameters, {d.world} "
                  f"process(es) on {d.device}", flush=True)
        t0 = time.time()
        try:
            for epoch in range(self.step // spe, math.ceil(total / spe)):
                if self.step >= total:
                    break
                skip = self.step - epoch * spe
                loader = epoch_loader(self.train_ds, tcfg, d, epoch, skip, spe, self.cfg.data.num_workers)
                stats = train_one_epoch(self.model, loader, self.optimizer, step=self.step, total_steps=total, cfg=tcfg,
                                        device=d.device, epoch=epoch,
                                        update_teacher=self.update_teacher if self.teacher_momentum is not None else None,
                                        on_step=self.on_step, progress=tcfg.progress and d.main and sys.stderr.isatty(),
                                        initial=skip, steps_in_epoch=spe)
                self.step = stats["step"]
                if self.evaluated_at != self.step and (tcfg.eval_every == 0 or self.step >= total):
                    self.validate(self.step)
                if self.saved_at != self.step:
                    self.checkpoint(self.step)
                if d.main:
                    shown = {k: v for k, v in self.last_val.items() if k in (self.best_key, "loss")}
                    print(f"[{stage}] epoch {epoch} step {self.step}/{total}: train loss "
                          f"{stats.get('loss', float('nan')):.4f}, val {', '.join(f'{k} {v:.4f}' for k, v in shown.items())} "
                          f"({stats['seconds']:.0f} s)", flush=True)
        except NonFiniteLoss as e:
            self.log.close()
            section, lr = self.section, tcfg.lr
            raise SystemExit(f"midi-rae {stage}: {e}. Lower {section}.lr (now {lr:g}), keep {section}.clip_grad "
                             f"set, or turn {section}.amp off, and continue from the last checkpoint: the same command "
                             f"with --resume and, e.g., {section}.lr={lr / 10:g}") from None
        if self.evaluated_at != self.step:
            self.validate(self.step)
        # Every process must end with the same weights: a cheap check that DDP synced.
        digests = all_gather(d, weights_digest(self.raw))
        agree = len(set(digests)) == 1
        final = {"step": self.step, "seconds": round(time.time() - t0, 1), "best": self.best, "best_step": self.best_step,
                 "weights_sha1": digests[d.rank], "ranks_agree": agree, "world_size": d.world,
                 **{f"val_{k}": v for k, v in self.last_val.items()}}
        self.log.log("final", self.step, {k: v for k, v in final.items() if k != "step"})  # the line has its step
        self.log.close()
        if not agree:
            raise RuntimeError(f"processes ended with different weights ({digests}); gradients were not synchronised")
        return final
