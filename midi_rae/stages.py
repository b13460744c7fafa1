"""The two training stages of a run, pretraining and decoder training: thin mains around
`engine.train_one_epoch`, shared by the commands that train (`train`, `train-decoder`, `run`,
`levels`). Each stage writes its folder of the run (`runs.stage_dirs`): `config.yaml`,
`metrics.jsonl`, `checkpoints/`, its weights (`encoder.safetensors` / `decoder.safetensors`), `tb/`.

Multi-process: launched by torchrun (WORLD_SIZE > 1), each process trains on its shard of every
epoch (DistributedSampler), gradients are averaged by DDP, and rank 0 alone logs, validates and
writes checkpoints.
"""
from __future__ import annotations

import hashlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from midi_rae.checkpoint import has_checkpoints, load_latest, load_weights, rng_state, save_checkpoint, save_weights, set_rng_state
from midi_rae.config import Config, ConfigError, TrainConfig
from midi_rae.data import PianoRollDataset
from midi_rae.distributed import Dist, all_gather, barrier, say, setup
from midi_rae.engine import (NonFiniteLoss, evaluate_decoder, evaluate_pretrain, momentum_at, param_groups,
                             train_one_epoch)
from midi_rae.logger import Logger
from midi_rae.models import DecoderTrainer, Pretrainer, build_decoder, build_encoder
from midi_rae.runs import encoder_config, resolve_cache_dir, stage_dirs, with_encoder_config
from midi_rae.utils import atomic_write_text, param_count

# The config section that holds each stage's training settings.
SECTIONS = {"pretrain": "train", "decoder": "decoder_train"}

# Fields that may differ between a run and its resumption: they do not change the result.
RESUMABLE_CHANGES = ("train.progress", "train.tensorboard", "train.wandb", "decoder_train.progress",
                     "decoder_train.tensorboard", "decoder_train.wandb", "data.num_workers")
# Fields that change the result from the resumed step on, and that the advice after a non-finite
# loss asks for: allowed on resume, and named in the log.
TUNABLE_ON_RESUME = ("lr", "min_lr", "warmup_steps", "clip_grad", "amp")


# ----------------------------------------------------------------------------- data


def datasets(cfg: Config, seed: int, pair: bool) -> tuple[PianoRollDataset, Subset]:
    cache = resolve_cache_dir(cfg)
    if not (cache / "pieces.jsonl").exists():
        raise FileNotFoundError(f"no prepared cache at {cache}: run `midi-rae prepare --cache-dir {cache}` "
                                f"(or `midi-rae run`, which prepares first), or set data.cache_dir")
    d = cfg.data
    kw = dict(crop_width=d.crop_width, pair=pair, max_time_shift=d.max_time_shift, max_pitch_shift=d.max_pitch_shift,
              val_fraction=d.val_fraction, channels=d.channels, seed=seed, view_mode=d.view_mode)
    train = PianoRollDataset(cache, "train", transpose=d.transpose, **kw)
    try:
        val = PianoRollDataset(cache, "val", **kw)
    except ValueError:
        raise ValueError(f"the cache {cache} has no validation pieces at data.val_fraction={d.val_fraction}; "
                         f"raise data.val_fraction or prepare more files") from None
    return train, Subset(val, range(min(len(val), d.val_max_items or len(val))))


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


# ----------------------------------------------------------------------------- the generic stage


def config_diff(a: dict, b: dict, prefix: str = "", allowed: tuple[str, ...] = RESUMABLE_CHANGES) -> list[str]:
    """`key: checkpoint A, now B` for each field that differs, except those under `allowed`."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{k}.", allowed)
        elif va != vb and not any(f"{prefix}{k}".startswith(r) for r in allowed):
            out.append(f"{prefix}{k}: checkpoint {va!r}, now {vb!r}")
    return out


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def fit(stage: str, cfg: Config, tcfg: TrainConfig, model: nn.Module, d: Dist, stage_dir: Path, resume: bool,
        evaluate: Callable[[nn.Module, DataLoader], dict[str, float]], best_key: str, pair: bool,
        lr_scales: dict[str, float] | None = None, teacher_momentum: tuple[float, float] | None = None) -> dict[str, Any]:
    """Train `model` (a Pretrainer or DecoderTrainer) for one stage; returns the final stats."""
    ckpt_dir = stage_dir / "checkpoints"
    if has_checkpoints(ckpt_dir) and not resume:
        raise ConfigError(f"{stage_dir} already holds checkpoints: pass --resume to continue that run, "
                          f"or choose another run name (name=...)")
    train_ds, val = datasets(cfg, tcfg.seed, pair)
    spe = steps_per_epoch(train_ds, tcfg, d)
    total = tcfg.max_steps or tcfg.epochs * spe
    n_epochs = math.ceil(total / spe)
    optimizer = torch.optim.AdamW(param_groups(model, tcfg.weight_decay, lr_scales), lr=tcfg.lr, betas=tuple(tcfg.betas))
    config_yaml = cfg.to_yaml()

    step, best, best_step = 0, None, None
    found = None
    if resume:  # rank 0 first: it alone sets unreadable checkpoints aside, the others then skip them
        found = load_latest(ckpt_dir, model) if d.main else None
        barrier(d)
        found = found if d.main else load_latest(ckpt_dir, model)
    if found is not None:
        latest, state, notes = found
        for note in notes:
            say(d, f"[{stage}] {note}; resuming from {latest.name}")
        section = SECTIONS[stage]
        tunable = tuple(f"{section}.{k}" for k in TUNABLE_ON_RESUME)
        diff = config_diff(state["config"], cfg.to_dict())
        refused = config_diff(state["config"], cfg.to_dict(), allowed=RESUMABLE_CHANGES + tunable)
        if refused:
            raise ConfigError(f"--resume: the config differs from the checkpoint's ({latest}):\n  " + "\n  ".join(refused)
                              + f"\nresume with the same config (see its config.yaml; only {', '.join(tunable)} may "
                                f"change), or start a new run name")
        for line in diff:
            say(d, f"[{stage}] changed on resume, from step {state['step']} on: {line}")
        optimizer.load_state_dict(state["optimizer"])
        step, best, best_step = state["step"], state["best"], state["best_step"]
        rngs = state["rng"]
        set_rng_state(rngs[d.rank] if len(rngs) == d.world else rngs[0])
        say(d, f"[{stage}] resumed from {latest} at step {step}")
    if d.main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stage_dir / "config.yaml", config_yaml)

    raw = model
    if tcfg.compile:
        model = torch.compile(model)
    if d.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                                    find_unused_parameters=True)
    log = Logger(stage_dir, cfg, stage, SECTIONS[stage], d.main, step)
    vloader = val_loader(val, tcfg.batch_size, cfg.data.num_workers)
    last_val: dict[str, float] = {}
    acc: dict[str, float] = {}
    saved_at = evaluated_at = -1
    if d.main:
        trainable, n_params = param_count(raw)
        print(f"[{stage}] {stage_dir}: {len(train_ds)} training crops, {len(val)} validation crops, {spe} steps/epoch, "
              f"{total} steps, {trainable:,} trainable of {n_params:,} parameters, {d.world} process(es) on {d.device}",
              flush=True)

    def validate(s: int) -> None:
        nonlocal best, best_step, last_val, evaluated_at
        if d.main:
            last_val = evaluate(raw, vloader)
            value = last_val.get(best_key)
            higher = best_key != "loss"
            if value is not None and math.isfinite(value) and (best is None or (value > best if higher else value < best)):
                best, best_step = value, s
            log.log("val", s, {**last_val, "best": best, "best_step": best_step})
        evaluated_at = s

    def checkpoint(s: int) -> None:
        nonlocal saved_at
        rngs = all_gather(d, rng_state())
        if d.main:
            state = {"stage": stage, "step": s, "optimizer": optimizer.state_dict(), "rng": rngs, "best": best,
                     "best_step": best_step, "config": cfg.to_dict()}
            save_checkpoint(ckpt_dir, s, raw, state, config_yaml, tcfg.keep_last, is_best=best_step == s)
        barrier(d)
        saved_at = s

    def on_step(s: int, stats: dict[str, float]) -> None:
        for k, v in stats.items():
            acc[k] = acc.get(k, 0.0) + v
        acc["_n"] = acc.get("_n", 0) + 1
        if s % tcfg.log_every == 0 or s == total:
            n = acc.pop("_n")
            log.log("train", s, {"epoch": (s - 1) // spe, **{k: v / n for k, v in acc.items()}})
            acc.clear()
        # The last step is validated before its checkpoint is written, so that a best last step
        # is saved as the best (best.json, the state's best_step and the log then agree).
        if (tcfg.eval_every and s % tcfg.eval_every == 0) or s == total:
            validate(s)
        if s % tcfg.ckpt_every == 0:
            checkpoint(s)

    update_teacher = None
    if teacher_momentum is not None:
        update_teacher = lambda s: raw.update_teacher(momentum_at(s, total, *teacher_momentum))  # noqa: E731
    t0 = time.time()
    try:
        for epoch in range(step // spe, n_epochs):
            if step >= total:
                break
            skip = step - epoch * spe
            loader = epoch_loader(train_ds, tcfg, d, epoch, skip, spe, cfg.data.num_workers)
            stats = train_one_epoch(model, loader, optimizer, step=step, total_steps=total, cfg=tcfg, device=d.device,
                                    epoch=epoch, update_teacher=update_teacher, on_step=on_step,
                                    progress=tcfg.progress and d.main and sys.stderr.isatty(), initial=skip,
                                    steps_in_epoch=spe)
            step = stats["step"]
            if evaluated_at != step and (tcfg.eval_every == 0 or step >= total):
                validate(step)
            if saved_at != step:
                checkpoint(step)
            if d.main:
                shown = {k: v for k, v in last_val.items() if k in (best_key, "loss")}
                print(f"[{stage}] epoch {epoch} step {step}/{total}: train loss {stats.get('loss', float('nan')):.4f}, "
                      f"val {', '.join(f'{k} {v:.4f}' for k, v in shown.items())} ({stats['seconds']:.0f} s)", flush=True)
    except NonFiniteLoss as e:
        log.close()
        section = SECTIONS[stage]
        raise SystemExit(f"midi-rae {stage}: {e}. Lower {section}.lr (now {tcfg.lr:g}), keep {section}.clip_grad "
                         f"set, or turn {section}.amp off, and continue from the last checkpoint: the same command "
                         f"with --resume and, e.g., {section}.lr={tcfg.lr / 10:g}") from None
    if evaluated_at != step:
        validate(step)
    digest = weights_digest(raw)
    digests = all_gather(d, digest)  # every process must end with the same weights: a cheap check that DDP synced
    agree = len(set(digests)) == 1
    final = {"step": step, "seconds": round(time.time() - t0, 1), "best": best, "best_step": best_step,
             "weights_sha1": digest, "ranks_agree": agree, "world_size": d.world, **{f"val_{k}": v for k, v in last_val.items()}}
    log.log("final", step, final)
    log.close()
    if not agree:
        raise RuntimeError(f"processes ended with different weights ({digests}); gradients were not synchronised")
    return final


# ----------------------------------------------------------------------------- the stages


def seed_all(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pretrain(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Encoder pretraining; writes `<run>/pretrain/` and returns the final stats."""
    d = setup(cfg.train)
    _, stage_dir, _ = stage_dirs(cfg)
    seed_all(cfg.train.seed)  # the same initial weights in every process
    model = Pretrainer(cfg).to(d.device)
    seed_all(cfg.train.seed + d.rank)  # different masks and drop paths per process
    o = cfg.objective
    evaluate = lambda m, loader: evaluate_pretrain(m, loader, d.device, o.mask_ratio, cfg.train.seed, cfg.train.amp)  # noqa: E731
    best_key = "masked_f1" if o.recon_weight > 0 else "loss"
    final = fit("pretrain", cfg, cfg.train, model, d, stage_dir, resume, evaluate, best_key, model.needs_views,
                teacher_momentum=(o.ema_momentum, o.ema_momentum_end) if model.teacher is not None else None)
    if d.main:
        meta = {"config": cfg.to_yaml(), "kind": "encoder", "step": str(final["step"])}
        save_weights(model.encoder.state_dict(), stage_dir / "encoder.safetensors", meta)
        print(f"[pretrain] encoder weights: {stage_dir / 'encoder.safetensors'}", flush=True)
    barrier(d)
    return final


def train_decoder(cfg: Config, encoder_path: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Decoder training on a frozen (or fine-tuned, `decoder.finetune_encoder`) encoder; writes `<run>/decoder/`."""
    d = setup(cfg.decoder_train)
    _, pre_dir, stage_dir = stage_dirs(cfg)
    enc_path = Path(encoder_path) if encoder_path else pre_dir / "encoder.safetensors"
    if enc_path.is_dir():
        enc_path = enc_path / "encoder.safetensors"
    if not enc_path.exists():
        raise FileNotFoundError(f"no encoder weights at {enc_path}: run `midi-rae train` with the same name first, "
                                f"or pass --encoder PATH")
    own = with_encoder_config(cfg, encoder_config(enc_path))
    if own != cfg:
        say(d, "[decoder] using the encoder's own model config and crop geometry (from its weights file)")
    cfg = own
    seed_all(cfg.decoder_train.seed)
    encoder = build_encoder(cfg)
    load_weights(encoder, enc_path)
    dc = cfg.decoder
    model = DecoderTrainer(encoder, build_decoder(cfg), dc.finetune_encoder, dc.pos_weight).to(d.device)
    seed_all(cfg.decoder_train.seed + d.rank)
    evaluate = lambda m, loader: evaluate_decoder(m, loader, d.device, dc.threshold, cfg.decoder_train.amp)  # noqa: E731
    scales = {"encoder.": dc.encoder_lr_scale} if dc.finetune_encoder else None
    final = fit("decoder", cfg, cfg.decoder_train, model, d, stage_dir, resume, evaluate, "f1", False, lr_scales=scales)
    if d.main:
        # An absolute path: the decoder's encoder is found from any working folder (checkpoint.decoder_encoder).
        meta = {"config": cfg.to_yaml(), "kind": "decoder", "step": str(final["step"]), "encoder": str(enc_path.resolve())}
        save_weights(model.decoder.state_dict(), stage_dir / "decoder.safetensors", meta)
        if dc.finetune_encoder:
            save_weights(model.encoder.state_dict(), stage_dir / "encoder.safetensors", dict(meta, kind="encoder"))
        print(f"[decoder] decoder weights: {stage_dir / 'decoder.safetensors'}", flush=True)
    barrier(d)
    return final
