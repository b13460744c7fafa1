"""`midi-rae probe`: linear probes on frozen embeddings for a label of the corpus metadata.

Crops: each piece of the cache is cut into non-overlapping windows of the encoder's width from
its start (at most `crops_per_piece`, windows with fewer than W/8 sounding columns skipped).
Split grouped by piece: a piece's crops all go to the test side or all to the training side,
by a hash of its piece id (`data.split_of`), so a probe never sees a test piece.

Features: a level's tokens mean-pooled over the grid, or (`level='all'`) the pooled levels
concatenated. The probe is multinomial logistic regression on standardized features with an
L2 penalty, fitted full-batch with L-BFGS (torch only; scikit-learn is not needed). Baselines:
the majority class of the training side, and the same logistic regression on the raw crop
average-pooled 4 x 4 (pitch x time). Reported: accuracy and balanced accuracy (mean per-class
recall) on the test side. The built-in task is collection classification on the bundled
corpus (e.g. bach / palestrina / monteverdi / essenFolksong).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from midi_rae.data import load_index, load_roll, load_settings, split_of
from midi_rae.encode import load_encoder
from midi_rae.utils import atomic_write_text

BUNDLED_TASK = ["bach", "palestrina", "monteverdi", "essenFolksong"]


@dataclass
class LabelledCrops:
    x: Tensor  # (N, C, 128, W) float in [0, 1]
    labels: list[str]
    pieces: list[str]  # piece id of each crop: the groups of the split


def pick_pieces(members: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The same n pieces every run, by a salted hash of the piece id. The salt matters: the
    train/test split hashes the piece's work key (`data.split_of`), and picking the n smallest of that
    same hash would put nearly every picked piece on the test side."""
    return sorted(members, key=lambda p: hashlib.sha1(f"probe-pick:{p['piece_id']}".encode()).digest())[:n]


def labelled_crops(cache_dir: str | os.PathLike, width: int, channels: int, label: str = "collection",
                   classes: list[str] | None = None, crops_per_piece: int = 4,
                   max_pieces_per_class: int = 150) -> LabelledCrops:
    """Crops of the pieces whose `label` is set (and in `classes`, if given); each class keeps
    at most `max_pieces_per_class` pieces, picked by a hash of the piece id (the same every run)."""
    scale = 127.0 if load_settings(cache_dir).velocity else 1.0
    by_class: dict[str, list[dict[str, Any]]] = {}
    for p in load_index(cache_dir):
        value = p.get(label)
        if value is not None and (classes is None or str(value) in classes):
            by_class.setdefault(str(value), []).append(p)
    xs, labels, pieces = [], [], []
    for value, members in sorted(by_class.items()):
        for p in pick_pieces(members, max_pieces_per_class):
            roll = load_roll(cache_dir, p)
            taken = 0
            for start in range(0, max(roll.shape[-1], 1), width):
                if taken == crops_per_piece:
                    break
                window = np.zeros((channels, 128, width), dtype=np.float32)
                part = roll[:channels, :, start:start + width]
                window[:, :, : part.shape[-1]] = part
                if (window[0] > 0).any(axis=0).sum() < width // 8:  # (nearly) silent: nothing to classify
                    continue
                xs.append(torch.from_numpy(window / scale))
                labels.append(value)
                pieces.append(p["piece_id"])
                taken += 1
    if len(set(labels)) < 2:
        raise ValueError(f"the probe needs at least 2 classes of {label!r} in {cache_dir}, found {sorted(set(labels))}; "
                         f"for the built-in task prepare the corpus with `midi-rae prepare --collections "
                         f"{' '.join(BUNDLED_TASK)} --cache-dir DIR` and pass --cache-dir DIR")
    return LabelledCrops(torch.stack(xs), labels, pieces)


@torch.no_grad()
def pooled_features(encoder: nn.Module, x: Tensor, level: int | str = "all", batch_size: int = 64) -> Tensor:
    """(N, C, 128, W) crops -> (N, F): one level's tokens averaged over the grid, or all levels' concatenated."""
    feats = []
    for i in range(0, len(x), batch_size):
        levels = encoder(x[i:i + batch_size]).patches
        chosen = list(levels) if level == "all" else [levels[int(level)]]
        feats.append(torch.cat([lvl.emb.mean(1) for lvl in chosen], dim=1).float())
    return torch.cat(feats)


def pixel_features(x: Tensor, pool: tuple[int, int] = (4, 4)) -> Tensor:
    """The raw-pixel baseline's input: the frame channel average-pooled, flattened: (N, 128*W / (ph*pw))."""
    return F.avg_pool2d(x[:, :1], pool).flatten(1)


def fit_logistic(x: Tensor, y: Tensor, n_classes: int, l2: float = 1e-2, max_iter: int = 200) -> Callable[[Tensor], Tensor]:
    """Multinomial logistic regression on standardized features; returns a predict function."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    lin = nn.Linear(x.shape[1], n_classes).double()
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    zd = z.double()

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(zd), y) + l2 * lin.weight.square().sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    return lambda new: lin(((new - mean) / std).double()).argmax(1)


def scores(pred: Tensor, true: Tensor) -> dict[str, float]:
    """accuracy and balanced accuracy (mean recall over the classes present in `true`)."""
    recalls = [float((pred[true == c] == c).float().mean()) for c in true.unique()]
    return {"accuracy": float((pred == true).float().mean()), "balanced_accuracy": float(np.mean(recalls))}


def grouped_split(pieces: list[str], test_fraction: float) -> Tensor:
    """(N,) bool, True for crops on the test side; decided per piece id."""
    return torch.tensor([split_of(p, test_fraction) == "val" for p in pieces])


def probe_features(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, n_classes: int,
                   l2: float = 1e-2) -> dict[str, float]:
    return scores(fit_logistic(train_x, train_y, n_classes, l2)(test_x), test_y)


def probe(checkpoints: list[str | os.PathLike], cache_dir: str | os.PathLike, label: str = "collection",
          classes: list[str] | None = None, level: int | str = "all", test_fraction: float = 0.25,
          crops_per_piece: int = 4, max_pieces_per_class: int = 150, l2: float = 1e-2) -> dict[str, Any]:
    """The probe of every checkpoint on the same pieces and split, with both baselines per crop geometry."""
    rows: list[dict[str, Any]] = []
    data_by_geometry: dict[tuple[int, int], LabelledCrops] = {}
    info: dict[str, Any] = {}
    for ck in checkpoints:
        encoder, cfg = load_encoder(ck)
        geometry = (encoder.img_size[1], encoder.in_chans)
        new = geometry not in data_by_geometry
        if new:
            data_by_geometry[geometry] = labelled_crops(cache_dir, *geometry, label, classes, crops_per_piece,
                                                        max_pieces_per_class)
        d = data_by_geometry[geometry]
        names = sorted(set(d.labels))
        y = torch.tensor([names.index(v) for v in d.labels])
        test = grouped_split(d.pieces, test_fraction)
        if test.all() or not test.any():
            raise ValueError(f"the grouped split put every piece on one side ({int(test.sum())} test crops); "
                             f"use more pieces or change --test-fraction")
        info = {"classes": names, "label": label, "train_crops": int((~test).sum()), "test_crops": int(test.sum()),
                "train_pieces": len({p for p, t in zip(d.pieces, test) if not t}),
                "test_pieces": len({p for p, t in zip(d.pieces, test) if t})}
        if new:
            majority = int(torch.bincount(y[~test], minlength=len(names)).argmax())
            rows.append({"model": f"majority class ({names[majority]})", "window": geometry[0], "features": 0,
                         **scores(torch.full_like(y[test], majority), y[test])})
            px = pixel_features(d.x)
            rows.append({"model": "raw pixels (4x4 avg-pooled), logistic", "window": geometry[0], "features": px.shape[1],
                         **probe_features(px[~test], y[~test], px[test], y[test], len(names), l2)})
        f = pooled_features(encoder, d.x, level)
        rows.append({"model": f"{cfg.name} ({cfg.model.encoder}), level {level}", "window": geometry[0],
                     "features": f.shape[1], **probe_features(f[~test], y[~test], f[test], y[test], len(names), l2)})
    return {**info, "level": level, "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = [f"Probe of {result['label']!r} ({', '.join(result['classes'])}): {result['train_crops']} training crops "
             f"from {result['train_pieces']} pieces, {result['test_crops']} test crops from {result['test_pieces']} "
             f"other pieces.", "", "| model | window | features | accuracy | balanced accuracy |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['window']} | {r['features']} | {r['accuracy']:.3f} | {r['balanced_accuracy']:.3f} |"
              for r in result["rows"]]
    return "\n".join(lines)


def add_probe(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser("probe", help="linear probes on frozen embeddings (e.g. collection classification), several runs",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="run folders or encoder weights; several (e.g. a Swin and a ViT run) make one table")
    p.add_argument("--cache-dir", help="labelled roll cache (default: the bundled corpus cache, see `midi-rae prepare`)")
    p.add_argument("--label", default="collection", help="metadata key to predict (default: collection)")
    p.add_argument("--classes", nargs="+", metavar="VALUE",
                   help=f"label values to keep (default for collection: {' '.join(BUNDLED_TASK)} where present, else all)")
    p.add_argument("--level", default="all", help="level index (0 = coarsest) or 'all' (pooled levels concatenated)")
    p.add_argument("--test-fraction", type=float, default=0.25, help="share of pieces on the test side")
    p.add_argument("--crops-per-piece", type=int, default=4)
    p.add_argument("--max-pieces-per-class", type=int, default=150)
    p.add_argument("--l2", type=float, default=1e-2, help="L2 penalty of the logistic regression")
    p.add_argument("-o", "--out", help="also write the result as JSON here")

    def run(args: argparse.Namespace) -> int:
        from midi_rae.prepare import default_cache_dir

        cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
        classes = args.classes
        if classes is None and args.label == "collection":
            present = {p.get("collection") for p in load_index(cache)}
            classes = [c for c in BUNDLED_TASK if c in present] or None
            classes = classes if classes and len(classes) > 1 else None
        level = args.level if args.level == "all" else int(args.level)
        result = probe(args.checkpoints, cache, args.label, classes, level, args.test_fraction,
                       args.crops_per_piece, args.max_pieces_per_class, args.l2)
        print(table(result))
        if args.out:
            atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
        return 0

    return run
