"""The two training stages of a run, pretraining and decoder training: each builds its model and
data and hands them to the training loop (`trainer.Trainer`); shared by the commands that train
(`train`, `train-decoder`, `run`, `levels`). Each stage writes its folder of the run
(`runs.stage_dirs`): `config.yaml`, `metrics.jsonl`, `checkpoints/`, its weights
(`encoder.safetensors` / `decoder.safetensors`), `tb/`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from midi_rae.checkpoint import load_weights, save_weights
from midi_rae.config import Config
from midi_rae.distributed import barrier, say, setup
from midi_rae.engine import evaluate_decoder, evaluate_pretrain
from midi_rae.models import DecoderTrainer, Pretrainer, build_decoder, build_encoder
from midi_rae.runs import datasets, encoder_config, stage_dirs, with_encoder_config
from midi_rae.trainer import Trainer


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
    evaluate = lambda m, loader: evaluate_pretrain(m, loader, d.device, cfg.train.seed, cfg.train.amp)  # noqa: E731
    best_key = "masked_f1" if o.recon_weight > 0 else "loss"
    train_ds, val = datasets(cfg, cfg.train.seed, model.needs_views)
    final = Trainer("pretrain", cfg, model, d, stage_dir, train_ds, val, evaluate, best_key, resume,
                    teacher_momentum=(o.ema_momentum, o.ema_momentum_end) if model.teacher is not None else None).run()
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
    train_ds, val = datasets(cfg, cfg.decoder_train.seed, False)
    final = Trainer("decoder", cfg, model, d, stage_dir, train_ds, val, evaluate, "f1", resume, lr_scales=scales).run()
    if d.main:
        # An absolute path: the decoder's encoder is found from any working folder (checkpoint.decoder_encoder).
        meta = {"config": cfg.to_yaml(), "kind": "decoder", "step": str(final["step"]), "encoder": str(enc_path.resolve())}
        save_weights(model.decoder.state_dict(), stage_dir / "decoder.safetensors", meta)
        if dc.finetune_encoder:
            save_weights(model.encoder.state_dict(), stage_dir / "encoder.safetensors", dict(meta, kind="encoder"))
        print(f"[decoder] decoder weights: {stage_dir / 'decoder.safetensors'}", flush=True)
    barrier(d)
    return final
