"""`midi-rae train`, `train-decoder` and `run`: thin mains around `engine.train_one_epoch`.

Run folder `<out_dir>/<name>/`:

- `pretrain/`: `config.yaml`, `metrics.jsonl`, `checkpoints/`, `encoder.safetensors`, `tb/`
- `decoder/`:  `config.yaml`, `metrics.jsonl`, `checkpoints/`, `decoder.safetensors`, `tb/`
- `recon.png`, `summary.json`, `summary.md` (written by `run` / `report`)

Multi-process: launched by torchrun (WORLD_SIZE > 1), each process trains on its shard of every
epoch (DistributedSampler), gradients are averaged by DDP, and rank 0 alone logs, validates and
writes checkpoints.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from midi_rae.checkpoint import (decoder_encoder, has_checkpoints, load_latest, load_weights, read_metadata, rng_state,
                                 save_checkpoint, save_weights, set_rng_state)
from midi_rae.config import Config, ConfigError, TrainConfig, from_dict
from midi_rae.data import PianoRollDataset
from midi_rae.engine import (NonFiniteLoss, evaluate_decoder, evaluate_pretrain, momentum_at, param_groups,
                             train_one_epoch)
from midi_rae.models import DecoderTrainer, Pretrainer, build_decoder, build_encoder
from midi_rae.utils import atomic_write_text, param_count

# The config section that holds each stage's training settings.
SECTIONS = {"pretrain": "train", "decoder": "decoder_train"}

# Fields that may differ between a run and its resumption: they do not change the result.
RESUMABLE_CHANGES = ("train.progress", "train.tensorboard", "train.wandb", "decoder_train.progress",
                     "decoder_train.tensorboard", "decoder_train.wandb", "data.num_workers")
# Fields that change the result from the resumed step on, and that the advice after a non-finite
# loss asks for: allowed on resume, and named in the log.
TUNABLE_ON_RESUME = ("lr", "min_lr", "warmup_steps", "clip_grad", "amp")


# ----------------------------------------------------------------------------- processes and devices


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(cfg: TrainConfig) -> Dist:
    """Device and, under torchrun (WORLD_SIZE > 1), the process group: NCCL on CUDA, gloo on CPU."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no GPU is visible; set train.device=cpu")
    device = torch.device(f"cuda:{local_rank}" if want == "cuda" else want)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank, dist.get_world_size() if dist.is_initialized() else 1, device)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def resolve_cache_dir(cfg: Config) -> Path:
    """`data.cache_dir`, else the cache `midi-rae prepare` makes of `data.paths` (or of the
    bundled corpus, restricted to `data.collections`)."""
    from midi_rae.cache import default_cache_dir

    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir).expanduser()
    return default_cache_dir(cfg.data.paths or None, cfg.data.collections or None)


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


# ----------------------------------------------------------------------------- logging


def log_lines_upto(path: Path, step: int) -> list[str]:
    """The lines of a metrics.jsonl up to `step`. A last line that does not parse is what a kill
    in mid-write leaves, and is dropped; any other line that does not parse is kept as it is."""
    lines = [l for l in path.read_text().splitlines() if l.strip()]
    keep = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                keep.append(line)
            continue
        if record.get("step", 0) <= step:
            keep.append(line)
    return keep


class Logger:
    """metrics.jsonl (one JSON line per log), TensorBoard when installed, wandb when asked. Rank 0 only."""

    def __init__(self, stage_dir: Path, cfg: Config, tcfg: TrainConfig, stage: str, enabled: bool, resume_step: int) -> None:
        self.enabled, self.path = enabled, stage_dir / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        if self.path.exists():  # drop lines a killed run wrote after its last checkpoint
            atomic_write_text(self.path, "".join(l + "\n" for l in log_lines_upto(self.path, resume_step)))
        if tcfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(stage_dir / "tb"))
            except ImportError:  # tensorboard is optional
                pass
        if tcfg.wandb:
            section = SECTIONS[stage]
            try:
                import wandb
            except ImportError:
                raise ConfigError(f"{section}.wandb is true but wandb is not installed: pip install wandb, "
                                  f"or set {section}.wandb=false") from None
            self.wandb = wandb.init(project=tcfg.wandb_project, name=f"{cfg.name}-{stage}", dir=str(stage_dir),
                                    mode=tcfg.wandb_mode, config=cfg.to_dict(), resume="allow")

    def log(self, split: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}
        line = {"split": split, "step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")  # undefined metrics (0 / 0) are written as null
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{split}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def say(d: Dist, msg: str) -> None:
    if d.main:
        print(msg, flush=True)


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
    log = Logger(stage_dir, cfg, tcfg, stage, d.main, step)
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
        rngs = [rng_state()]
        if d.world > 1:
            gathered: list[Any] = [None] * d.world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
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
    agree = True
    if d.world > 1:  # every process must end with the same weights: a cheap check that DDP synced
        digests: list[Any] = [None] * d.world
        dist.all_gather_object(digests, digest)
        agree = len(set(digests)) == 1
    final = {"step": step, "seconds": round(time.time() - t0, 1), "best": best, "best_step": best_step,
             "weights_sha1": digest, "ranks_agree": agree, "world_size": d.world, **{f"val_{k}": v for k, v in last_val.items()}}
    log.log("final", step, final)
    log.close()
    if not agree:
        raise RuntimeError(f"processes ended with different weights ({digests}); gradients were not synchronised")
    return final


# ----------------------------------------------------------------------------- the stages


def stage_dirs(cfg: Config) -> tuple[Path, Path, Path]:
    run = Path(cfg.out_dir) / cfg.name
    return run, run / "pretrain", run / "decoder"


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


def encoder_config(path: Path) -> Config:
    """The config an exported encoder (or checkpoint) was trained with, from its metadata."""
    meta = read_metadata(path)
    if "config" not in meta:
        raise ValueError(f"{path} carries no config in its metadata; use an encoder.safetensors written by `midi-rae train`")
    return from_dict(Config, yaml.safe_load(meta["config"]))


def with_encoder_config(cfg: Config, enc_cfg: Config, d: Dist) -> Config:
    """`cfg` with the model (and the crop geometry it needs) of the encoder's own config."""
    new = dataclasses.replace(cfg, model=enc_cfg.model, data=dataclasses.replace(
        cfg.data, crop_width=enc_cfg.data.crop_width, channels=enc_cfg.data.channels))
    if new.model != cfg.model or new.data != cfg.data:
        say(d, "[decoder] using the encoder's own model config and crop geometry (from its weights file)")
    return new


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
    cfg = with_encoder_config(cfg, encoder_config(enc_path), d)
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


# ----------------------------------------------------------------------------- report


def load_trained(cfg: Config, device: torch.device | str = "cpu") -> DecoderTrainer:
    """The decoder a run ended with and the encoder it was trained on (fine-tuned, if it was)."""
    dec_path = stage_dirs(cfg)[2] / "decoder.safetensors"
    enc_path = decoder_encoder(dec_path)
    enc_cfg = encoder_config(dec_path)
    encoder, decoder = build_encoder(enc_cfg), build_decoder(enc_cfg)
    load_weights(encoder, enc_path)
    load_weights(decoder, dec_path)
    return DecoderTrainer(encoder, decoder).to(device).eval()


def _last(path: Path, split: str) -> dict[str, Any]:
    lines = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
    return next((l for l in reversed(lines) if l["split"] == split), {})


def report(cfg: Config, n_examples: int = 4) -> dict[str, Any]:
    """Reconstruction figure and summary of a finished run: `recon.png`, `summary.json`, `summary.md`."""
    from midi_rae.plots import recon_figure

    run_dir, pre_dir, dec_dir = stage_dirs(cfg)
    model = load_trained(cfg)
    enc_cfg = encoder_config(dec_dir / "decoder.safetensors")
    _, val = datasets(with_encoder_config(cfg, enc_cfg, Dist(rank=1)), enc_cfg.decoder_train.seed, False)
    # One crop from each of several validation pieces: the fullest among a piece's first crops.
    by_piece: dict[str, Any] = {}
    for i in range(len(val)):
        it = val[i]
        if float(it["x"][0].sum()) > float(by_piece.get(it["piece_id"], {"x": torch.zeros(1)})["x"][0].sum()):
            by_piece[it["piece_id"]] = it
    items = sorted(by_piece.values(), key=lambda it: -float(it["x"][0].sum()))[:n_examples]
    x = torch.stack([it["x"] for it in items])
    with torch.no_grad():
        probs = model.logits(x).sigmoid()
    thr = enc_cfg.decoder.threshold
    labels = [f"{it['piece_id']} @ {it['start']}" for it in items]
    fig = recon_figure(x[:, 0].numpy(), probs[:, 0].numpy(), run_dir / "recon.png", thr,
                       f"{cfg.name}: validation crops, frame channel", labels)
    pre_final, dec_final = _last(pre_dir / "metrics.jsonl", "final"), _last(dec_dir / "metrics.jsonl", "final")
    pre_val, dec_val = _last(pre_dir / "metrics.jsonl", "val"), _last(dec_dir / "metrics.jsonl", "val")
    summary = {
        "name": cfg.name, "encoder": enc_cfg.model.encoder, "figure": str(fig),
        "pretrain": {"steps": pre_final.get("step"), "seconds": pre_final.get("seconds"),
                     **{k: pre_val.get(k) for k in ("loss", "masked_precision", "masked_recall", "masked_f1", "samples") if k in pre_val}},
        "decoder": {"steps": dec_final.get("step"), "seconds": dec_final.get("seconds"),
                    **{k: dec_val.get(k) for k in ("loss", "precision", "recall", "specificity", "f1", "threshold") if k in dec_val}},
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    p, q = summary["pretrain"], summary["decoder"]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    md = [f"# {cfg.name}: validation summary", "",
          f"Encoder: {enc_cfg.model.encoder}, pretrained {p['steps']} steps ({p['seconds']} s); decoder "
          f"{q['steps']} steps ({q['seconds']} s).", "",
          "| stage | metric | value |", "|---|---|---|"]
    md += [f"| pretrain (masked patches, per-sample mean, p > 0.5) | {k} | {fmt(v)} |" for k, v in p.items() if k not in ("steps", "seconds")]
    md += [f"| decoder (pixels of the frame channel inside the piece, p > {q.get('threshold', thr)}) | {k} | {fmt(v)} |" for k, v in q.items() if k not in ("steps", "seconds", "threshold")]
    md += ["", f"![reconstruction]({fig.name})", "",
           "Error map: black = note kept (TP), red = invented (FP), blue = missed (FN); low pitches at the bottom."]
    atomic_write_text(run_dir / "summary.md", "\n".join(md) + "\n")
    return summary


def probe_summary(cfg: Config) -> dict[str, Any] | None:
    """The probe suite's headline for a finished run (all levels, 2 crops per piece), written to
    `probe.json` / `probe.md` / `probe.png` in the run folder; None when the run's data carries no
    label with two classes to probe."""
    from midi_rae.probe import figure, headline, probe, table

    run_dir = stage_dirs(cfg)[0]
    try:
        result = probe([run_dir], resolve_cache_dir(cfg), level="all", crops_per_piece=2)
    except ValueError as e:  # no task in this corpus's metadata
        print(f"[probe] skipped: {e}", flush=True)
        return None
    atomic_write_text(run_dir / "probe.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(run_dir / "probe.md", table(result) + "\n")
    figure(result, run_dir / "probe.png")
    return {"models": result["models"], "headline": headline(result)}


def _probe_markdown(p: dict[str, Any]) -> list[str]:
    names = ["majority class", "raw pixels", "descriptors", *p["models"]]
    md = ["", "## Linear probes (balanced accuracy on held-out pieces; all levels pooled; details in probe.md)", "",
          "| task | classes | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    md += [f"| {h['task']} | {h['classes']} | " + " | ".join(f"{h.get(n, float('nan')):.3f}" for n in names) + " |"
           for h in p["headline"]]
    return md + ["", "The random-initialisation twin has the trained encoder's shape: what pretraining added is the "
                 "difference; the descriptors are hand-crafted music statistics (midi_rae.descriptors)."]


def run_all(cfg: Config, resume: bool = False, workers: int | None = None, probe: bool = True) -> dict[str, Any]:
    """prepare -> pretrain -> decoder -> report -> probe suite: the package's main job."""
    from midi_rae.data import RollSettings
    from midi_rae.cache import prepare

    t0 = time.time()
    rank = int(os.environ.get("RANK", "0"))
    cache = resolve_cache_dir(cfg)
    if rank == 0:  # other processes wait at the first barrier of pretraining
        summary = prepare(cfg.data.paths or None, cache, RollSettings(),
                          workers=workers, progress=sys.stderr.isatty(), collections=cfg.data.collections)
        print(f"[prepare] {summary.line()} -> {cache} ({time.time() - t0:.0f} s)", flush=True)
        if summary.pieces == 0:
            raise ValueError(f"none of the {summary.files} input files gave a usable piece (reasons in "
                             f"{cache / 'report.txt'}); set data.paths to MIDI, ABC or MusicXML files with notes")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        setup(cfg.train)
        dist.barrier()
    pretrain(cfg, resume)
    train_decoder(cfg, resume=resume)
    out = {}
    if rank == 0:
        out = report(cfg)
        run_dir = stage_dirs(cfg)[0]
        if probe and (p := probe_summary(cfg)) is not None:
            out["probe"] = p
            md = (run_dir / "summary.md").read_text().rstrip("\n").split("\n") + _probe_markdown(p)
            atomic_write_text(run_dir / "summary.md", "\n".join(md) + "\n")
        out["wall_seconds"] = round(time.time() - t0, 1)
        atomic_write_text(run_dir / "summary.json", json.dumps(out, indent=1) + "\n")
        print(f"[run] done in {out['wall_seconds']:.0f} s: {run_dir}/summary.md, {out['figure']}", flush=True)
        print(json.dumps({"pretrain": out["pretrain"], "decoder": out["decoder"]}), flush=True)
    return out


# ----------------------------------------------------------------------------- command line


def _common(p, what: str) -> None:
    from midi_rae.config import describe

    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. model.embed_dim=16 train.lr=3e-4 name=my_run (see below)")
    p.add_argument("-c", "--config", default="quickstart",
                   help="YAML preset: a name in configs/ (quickstart, swin_midi, swin_midi_p2, vit_baseline) "
                        "or a path (default: quickstart)")
    p.add_argument("--resume", action="store_true",
                   help=f"continue the {what} of this run name from its latest checkpoint (exactly: same batches, "
                        f"same random draws); without a checkpoint, start fresh. Safe to always pass on preemptible machines")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.epilog = ("Run folder: <out_dir>/<name>/ with pretrain/ and decoder/ (config.yaml, metrics.jsonl, checkpoints/, "
                "weights), recon.png, summary.md.\nMulti-GPU / multi-process: torchrun --nproc_per_node=N -m midi_rae "
                f"{p.prog.split()[-1]} ...\n\nconfig fields (KEY=VALUE):\n" + describe())
    p.formatter_class = __import__("argparse").RawDescriptionHelpFormatter


def _config(args) -> Config | None:
    from midi_rae.config import load_config, resolve_config_path

    cfg = load_config(resolve_config_path(args.config), args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return None
    return cfg


def add_train(sub) -> Callable:
    p = sub.add_parser("train", help="pretrain an encoder (SimMIM, masked embedding prediction, LeJEPA, ...)",
                       description="Pretrain an encoder on a prepared roll cache with the objectives whose weights "
                                   "in the config are non-zero. Writes <out_dir>/<name>/pretrain/.")
    _common(p, "pretraining")

    def run(args) -> int:
        cfg = _config(args)
        if cfg is not None:
            pretrain(cfg, args.resume)
        return 0

    return run


def add_train_decoder(sub) -> Callable:
    p = sub.add_parser("train-decoder", help="train a decoder on a frozen (or fine-tuned) pretrained encoder",
                       description="Train a SwinDecoder / ViTDecoder to reconstruct piano rolls from a pretrained "
                                   "encoder's pyramid (frozen unless decoder.finetune_encoder=true). Writes "
                                   "<out_dir>/<name>/decoder/. The encoder's model config is read from its weights file.")
    _common(p, "decoder training")
    p.add_argument("--encoder", metavar="PATH",
                   help="encoder.safetensors (or a folder holding one); default: <out_dir>/<name>/pretrain/encoder.safetensors")

    def run(args) -> int:
        cfg = _config(args)
        if cfg is not None:
            train_decoder(cfg, args.encoder, args.resume)
        return 0

    return run


def add_run(sub) -> Callable:
    p = sub.add_parser("run", help="the whole job: prepare -> pretrain -> decoder -> evaluation and figure",
                       description="Prepare the data (the bundled music21 corpus unless data.paths is set; cached, so a "
                                   "second run is fast), pretrain the encoder, train the decoder, then write the "
                                   "validation summary (summary.md / summary.json) and a reconstruction figure (recon.png).")
    _common(p, "run")
    p.add_argument("--workers", type=int, help="processes for the prepare step (default: all cores)")
    p.add_argument("--no-probe", action="store_true", help="leave out the probe suite at the end (see `midi-rae probe`)")

    def run(args) -> int:
        cfg = _config(args)
        if cfg is not None:
            run_all(cfg, args.resume, args.workers, probe=not args.no_probe)
        return 0

    return run
