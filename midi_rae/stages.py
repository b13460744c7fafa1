"""The training stages: pretraining and decoder training, the two of a run, and supervised
fine-tuning with a classification head: each builds its model and data and hands them to the
training loop (`trainer.Trainer`); shared by the commands that train (`train`, `train-decoder`,
`run`, `levels`, `finetune`). Each stage writes its folder (`runs.stage_dirs` for a run's two):
`config.yaml`, `metrics.jsonl`, `checkpoints/`, its weights (`encoder.safetensors` /
`decoder.safetensors` / `classifier.safetensors`), `tb/`.
"""
from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from midi_rae.cache import cache_identity, load_index, piece_work
from midi_rae.checkpoint import has_checkpoints, load_weights, save_weights
from midi_rae.config import Config
from midi_rae.dataset import PianoRollDataset
from midi_rae.distributed import barrier, say, setup
from midi_rae.engine import classify, evaluate_classifier, evaluate_decoder, evaluate_pretrain
from midi_rae.labels import TASKS, Task, find_tasks, grouped_split, label_of, piece_crops
from midi_rae.metrics import class_confusion, scores
from midi_rae.models import Classifier, DecoderTrainer, Pretrainer, build_decoder, build_encoder
from midi_rae.probes import select_and_fit, standardization
from midi_rae.runs import (Checkpoint, check_time_grid, datasets, encoder_config, resolve_cache_dir, stage_dirs,
                           tests_on_training_pieces, trained_encoder, with_encoder_config)
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
        # The cache's identity: later commands check that the run's own cache still holds its split.
        meta = {"config": cfg.to_yaml(), "kind": "encoder", "step": str(final["step"]),
                "cache": cache_identity(resolve_cache_dir(cfg))}
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
    train_ds, val = datasets(cfg, cfg.decoder_train.seed, False, enc_path)  # the encoder's cache still holds its split
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


# ----------------------------------------------------------------------------- fine-tuning


def labelled_task(cfg: Config, cache: Path) -> Task:
    """The task of `finetune.label` on `cache`, split as the probe suite splits it, or a ValueError
    saying what to change (a label no piece has, or fewer than two classes with enough pieces)."""
    f = cfg.finetune
    index = load_index(cache)
    test_fraction = f.test_fraction if f.test_fraction is not None else cfg.data.val_fraction
    min_test = max(f.min_pieces // 5, 2)
    found = find_tasks(index, test_fraction, [f.label], f.classes, f.min_pieces, min_test, f.max_classes,
                       f.max_pieces_per_class)
    if found:
        return found[0]
    counts = Counter(v for p in index if (v := label_of(p, f.label)) is not None and (f.classes is None or v in f.classes))
    if not counts:
        have = [t for t in TASKS if any(label_of(p, t) is not None for p in index)]
        raise ValueError(f"no piece of {cache} has a {f.label!r} label" + (f" among --classes {' '.join(f.classes)}" if f.classes else "")
                         + f"; use --label with one of: {', '.join(have) or 'none (this cache has no labels)'}")
    top = ", ".join(f"{v} ({n})" for v, n in counts.most_common(4))
    raise ValueError(f"--label {f.label} has {len(counts)} class(es) in {cache} ({top} pieces), and fewer than two with "
                     f"{f.min_pieces} training and {min_test} test pieces each; a classifier needs two: choose another "
                     f"label, lower finetune.min_pieces, or prepare a cache with more classes (e.g. `midi-rae prepare "
                     f"--collections bach palestrina monteverdi essenFolksong --cache-dir DIR`, then --cache-dir DIR)")


def finetune_split(cfg: Config, cache: Path) -> tuple[Task, list[dict[str, Any]], list[dict[str, Any]]]:
    """The task, and its training pieces split (by work, salted hash) into those trained on and a
    `finetune.val_fraction` held out for validation; the test pieces are `task.test`."""
    task = labelled_task(cfg, cache)
    val_fraction = cfg.finetune.val_fraction
    held = grouped_split([piece_work(p) for p in task.train], val_fraction, salt="finetune-val:").tolist()
    train = [p for p, h in zip(task.train, held) if not h]
    val = [p for p, h in zip(task.train, held) if h]
    if not train or not val:
        raise ValueError(f"finetune.val_fraction={val_fraction} leaves {len(train)} training and {len(val)} validation "
                         f"pieces of {len(task.train)}; change finetune.val_fraction")
    return task, train, val


def fixed_crops(cache: Path, pieces: list[dict[str, Any]], labels: dict[str, int], cfg: Config) -> list[dict[str, Any]]:
    """The probe suite's crops of `pieces` (`labels.piece_crops`), each with its class `y`."""
    crops = piece_crops(cache, pieces, cfg.data.crop_width, cfg.finetune.test_crops_per_piece)
    x = crops.x[:, : cfg.data.channels]  # (N, C, 128, W)
    return [{"x": x[i], "y": labels[pid], "piece_id": pid} for i, pid in enumerate(crops.pieces)]


class StartCrops(torch.utils.data.Dataset):
    """Fixed crops (`fixed_crops`) as a training set, with the interface the trainer and
    `class_weights` read: every crop an item of its own, the same ones every epoch."""

    def __init__(self, crops: list[dict[str, Any]]) -> None:
        self.crops, self.labels = crops, np.array([c["y"] for c in crops])

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.crops[i]["x"], "y": self.crops[i]["y"]}

    def items_per_piece(self) -> np.ndarray:
        return np.ones(len(self.crops))  # (N,) one item per crop

    def set_epoch(self, epoch: int) -> None:  # the crops do not change between epochs
        pass


def class_weights(ds: PianoRollDataset | StartCrops, n_classes: int) -> Tensor:
    """(n_classes,) inverse share of each class among the dataset's items (crops), mean 1 over the
    items: every class then weighs as much in the loss, however long its pieces are."""
    counts = np.bincount(ds.labels, weights=ds.items_per_piece(), minlength=n_classes)  # (n_classes,) crops
    w = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


@torch.no_grad()
def probe_head(model: Classifier, crops: list[dict[str, Any]], n_classes: int, device: torch.device,
               batch_size: int) -> dict[str, float]:
    """Set the head to the linear probe of the model's own features (pooled level, LayerNorm) on
    `crops`, its L2 chosen on a grouped hold-out as the probe suite chooses it (LP-FT: fine-tuning
    from a fitted head moves the features less, https://arxiv.org/abs/2202.10054)."""
    was_training = model.training
    model.eval()
    feats = torch.cat([model.features(torch.stack([c["x"] for c in crops[i:i + batch_size]]).to(device)).float().cpu()
                       for i in range(0, len(crops), batch_size)])  # (N, D)
    model.train(was_training)
    y = torch.tensor([c["y"] for c in crops])
    lin, l2, inner = select_and_fit(feats, y, [c["piece_id"] for c in crops], n_classes)
    fitted = scores(lin(feats.double()).argmax(1), y)
    if isinstance(model.bn, torch.nn.BatchNorm1d):  # its statistics: the probe's standardisation, unfolded from lin
        mean, std = standardization(feats)
        model.bn.running_mean.copy_(mean)
        model.bn.running_var.copy_(std.square())
        lin.bias += lin.weight @ mean  # (W / std) x + b - (W / std) mean  ->  W z + b, z standardised
        lin.weight *= std
    model.head.weight.copy_(lin.weight)
    model.head.bias.copy_(lin.bias)
    return {"l2": l2, "holdout_balanced_accuracy": inner, **fitted}


def check_not_pretrained_on(cfg: Config, cache: Path, checkpoint: Checkpoint) -> None:
    """On the cache the encoder pretrained on, the test pieces (the works hashed under the test
    fraction) must lie in its validation side (`data.val_fraction` then), and the cache must be
    the one it read (`check_time_grid` with its weights), as the probe suite requires."""
    pre = checkpoint.config
    check_time_grid(pre, cache, checkpoint.encoder.path)
    test_fraction = cfg.finetune.test_fraction if cfg.finetune.test_fraction is not None else cfg.data.val_fraction
    if tests_on_training_pieces(pre, cache, test_fraction):
        raise ValueError(f"the test fraction {test_fraction} (finetune.test_fraction, else data.val_fraction) is above "
                         f"the data.val_fraction {pre.data.val_fraction} that {pre.name} pretrained with on {cache}, so "
                         f"some test pieces were its training pieces; set finetune.test_fraction={pre.data.val_fraction} "
                         f"or less, or fine-tune on another cache (--cache-dir)")


def finetune(cfg: Config, stage_dir: Path, checkpoint: Checkpoint | None = None, resume: bool = False) -> dict[str, Any]:
    """The encoder (`checkpoint`'s weights, or its random initialisation with `finetune.scratch`)
    and a classification head trained on `finetune.label` (`Classifier`), on random crops of the
    task's training pieces less a grouped hold-out (`finetune.val_fraction`) that validates and picks
    the best checkpoint; then the final weights scored on the test pieces' fixed crops, the probe
    suite's own. Writes `stage_dir` and returns the test result (accuracy, balanced accuracy,
    confusion matrix) with the training's final stats."""
    f, tcfg = cfg.finetune, cfg.finetune_train
    if not f.scratch and checkpoint is None:
        raise ValueError("fine-tuning needs the run to start from; or pass --scratch for the random-initialisation baseline")
    d = setup(tcfg)
    cache = resolve_cache_dir(cfg)
    check_time_grid(cfg, cache)
    if not f.scratch:
        check_not_pretrained_on(cfg, cache, checkpoint)
    task, train_pieces, val_pieces = finetune_split(cfg, cache)
    labels = {p["piece_id"]: task.classes.index(label_of(p, task.name)) for p in task.train + task.test}
    seed_all(tcfg.seed)  # the same initial weights (and head) in every process
    encoder = build_encoder(cfg) if f.scratch else trained_encoder(checkpoint, cfg)
    dc = cfg.data
    start = functools.cache(lambda: fixed_crops(cache, train_pieces, labels, cfg))  # rendered once, if used
    if f.train_crops == "start":
        train_ds = StartCrops(start())
    else:
        train_ds = PianoRollDataset(cache, "train", crop_width=dc.crop_width, pair=False, transpose=dc.transpose,
                                    channels=dc.channels, seed=tcfg.seed, pieces=train_pieces, labels=labels)
    model = Classifier(encoder, len(task.classes), f.level, f.pool, f.label_smoothing,
                       class_weights(train_ds, len(task.classes)) if f.balance else None, f.batch_norm).to(d.device)
    seed_all(tcfg.seed + d.rank)
    val, test = fixed_crops(cache, val_pieces, labels, cfg), fixed_crops(cache, task.test, labels, cfg)
    head: dict[str, float] = {}
    if f.head_init == "probe" and not (resume and has_checkpoints(stage_dir / "checkpoints")):  # else: resumed weights
        head = probe_head(model, start(), len(task.classes), d.device, tcfg.batch_size * 8)
        say(d, f"[finetune] head initialised as the linear probe of the training crops: training balanced accuracy "
               f"{head['balanced_accuracy']:.3f} (L2 {head['l2']:g})")
    evaluate = lambda m, loader: evaluate_classifier(m, loader, d.device, tcfg.amp)  # noqa: E731
    final = Trainer("finetune", cfg, model, d, stage_dir, train_ds, val, evaluate, "balanced_accuracy", resume).run()
    result: dict[str, Any] = {}
    if d.main:
        pred, true, loss = classify(model, DataLoader(test, batch_size=tcfg.batch_size), d.device, tcfg.amp)
        result = {"label": task.name, "classes": task.classes, "level": f.level, "pool": f.pool, "scratch": f.scratch,
                  "cache": str(cache), "train_pieces": len(train_pieces), "val_pieces": len(val_pieces),
                  "test_pieces": len(task.test), "test_crops": len(test), "probe_head": head,
                  "test": {"loss": loss, **scores(pred, true),
                           "confusion": class_confusion(pred, true, len(task.classes)).tolist()},
                  "final": final}
        meta = {"config": cfg.to_yaml(), "step": str(final["step"]), "classes": json.dumps(task.classes)}
        save_weights(model.state_dict(), stage_dir / "classifier.safetensors", dict(meta, kind="classifier"))
        save_weights(model.encoder.state_dict(), stage_dir / "encoder.safetensors", dict(meta, kind="encoder"))
        print(f"[finetune] classifier weights: {stage_dir / 'classifier.safetensors'}", flush=True)
    barrier(d)
    return result
