"""The probe suite (run by `midi-rae probe` and at the end of `midi-rae run`). Linear probes on frozen embeddings for every label of the
corpus metadata, against the baselines an embedding has to beat to be worth using.

Tasks: `collection`, `composer`, `time_signature`, `mode` (major / minor, from the key) and
`source_set` (the source file's name without its number, within one collection: the Essen folk
songs' regions), each with the classes that have enough works on both sides of the split (at most
`--max-classes`, the most frequent; a work stored in two formats, or a mass's sections, count once). Split grouped by
work, by a hash of the piece's work (`cache.split_of`, `pieces.jsonl`'s `work`) at the run's `data.val_fraction`: the test pieces are the run's validation
pieces, which the encoder never trained on. Crops: each piece is cut into non-overlapping
windows of the encoder's width from its start (at most `crops_per_piece`, windows with fewer
than W/8 sounding columns skipped); every piece counts at most `max_pieces_per_class` (train)
or a quarter of that (test), picked by a salted hash of its id, the same every run.

Rows, on the same crops: the majority class; raw pixels (every channel average-pooled 4 x 4);
hand-crafted music descriptors (`midi_rae.descriptors`); the same encoder at random
initialisation; the trained encoder. Encoder features: every level (0 = coarsest) pooled by
the mean over all tokens or over the non-empty tokens only, and all levels concatenated.
The probe is multinomial logistic regression on standardized features, fitted full-batch with
L-BFGS; its L2 penalty is chosen on a grouped hold-out of the training pieces, never on the
test pieces, and so is each encoder's headline feature set. Reported: balanced accuracy
(mean per-class recall) and accuracy on the test side, with a 95 % bootstrap interval of the
balanced accuracy (1,000 resamples of the test works, with replacement: a work's crops are drawn
together), and each trained encoder's headline minus its random twin's and minus the pixel and
descriptor baselines, with intervals from the same resamples (paired): a test side of a few dozen
works per class moves balanced accuracy by several hundredths, and the interval says how many.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from midi_rae.cache import load_index, piece_work
from midi_rae.config import Config
from midi_rae.core import PatchState
from midi_rae.descriptors import descriptors
from midi_rae.labels import TASKS, Crops, Task, find_tasks, grouped_split, label_of, piece_crops
from midi_rae.metrics import bootstrap_balanced_accuracy, scores
from midi_rae.runs import (check_time_grid, initial_encoder, load_encoder, pretraining_config, resolve_checkpoint,
                           tests_on_training_pieces)
from midi_rae.utils import atomic_write, atomic_write_text

BUNDLED_TASK = ["bach", "palestrina", "monteverdi", "essenFolksong"]
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
BASELINES = ("majority class", "raw pixels", "descriptors")  # the rows every encoder is read against
TWIN = " at random init"  # a random twin's name: its encoder's name + this
N_BOOT = 1000  # bootstrap resamples of the test works behind every interval


def time_self_similarity(lvl: PatchState) -> Tensor | None:
    """(B, cols // 2): for each time lag 1..cols // 2 of a level's grid, the mean cosine
    similarity between its columns' embeddings (each the mean of the column's non-empty tokens)
    that lie that lag apart; None for a level narrower than 4 columns (or without a grid, like
    ViT's CLS token). A phase-free, second-order pooling: where the mean over tokens averages the
    metre away, the similarity of the representation one bar apart keeps it (the learned
    counterpart of the onset autocorrelation among the descriptors)."""
    rows, cols = int(lvl.pos[:, 0].max()) + 1, int(lvl.pos[:, 1].max()) + 1
    if cols < 4 or rows * cols != lvl.num_patches:
        return None
    col = F.normalize(lvl.column_means().float(), dim=-1)  # (B, cols, D)
    sounding = lvl.non_empty.reshape(len(lvl.emb), rows, cols).any(1).float()  # (B, cols)
    out = []
    for lag in range(1, cols // 2 + 1):
        sim = (col[:, lag:] * col[:, :-lag]).sum(-1)  # (B, cols - lag)
        both = sounding[:, lag:] * sounding[:, :-lag]
        out.append((sim * both).sum(1) / both.sum(1).clamp_min(1))
    return torch.stack(out, 1)  # (B, cols // 2)


@torch.inference_mode()
def level_features(encoder: nn.Module, x: Tensor, batch_size: int = 256) -> dict[str, Tensor]:
    """(N, C, 128, W) crops -> {feature set name: (N, F)}: each level pooled by the mean over all
    tokens ('L{i} mean') and over its non-empty tokens ('L{i} non-empty'), both poolings of all
    levels concatenated ('all mean', 'all non-empty'), and the latter with every level's time
    self-similarity appended ('all non-empty + self-sim', see `time_self_similarity`). Level 0 is
    the coarsest. An encoder with a time stage (`swin.TimeStage`) adds the mean of its tokens
    ('time stage') and that appended to the last ('all non-empty + self-sim + time stage')."""
    chunks: dict[str, list[Tensor]] = {}
    for i in range(0, len(x), batch_size):
        sims = []
        out = encoder(x[i:i + batch_size])
        if out.time is not None:
            chunks.setdefault("time stage", []).append(out.time.pooled(non_empty_only=False).float())
        for j, lvl in enumerate(out.patches):
            chunks.setdefault(f"L{j} mean", []).append(lvl.pooled(non_empty_only=False).float())
            chunks.setdefault(f"L{j} non-empty", []).append(lvl.pooled().float())
            if (sim := time_self_similarity(lvl)) is not None:
                sims.append(sim)
        if sims:
            chunks.setdefault("self-sim", []).append(torch.cat(sims, dim=1))  # (b, sum over levels of cols // 2)
    feats = {k: torch.cat(v) for k, v in chunks.items()}
    sim = feats.pop("self-sim", None)
    time = feats.pop("time stage", None)
    n = len([k for k in feats if k.endswith(" mean")])
    for pool in ("mean", "non-empty"):
        feats[f"all {pool}"] = torch.cat([feats[f"L{j} {pool}"] for j in range(n)], dim=1)
    if sim is not None:
        feats["all non-empty + self-sim"] = torch.cat([feats["all non-empty"], sim], dim=1)
    if time is not None:
        last = "all non-empty + self-sim" if sim is not None else "all non-empty"
        feats["time stage"] = time
        feats[f"{last} + time stage"] = torch.cat([feats[last], time], dim=1)
    return feats


def pixel_features(x: Tensor, pool: tuple[int, int] = (4, 4)) -> Tensor:
    """The raw-pixel baseline's input: every channel (frame, onset) average-pooled, flattened:
    (N, C*128*W / (ph*pw)), as the descriptors too read both."""
    return F.avg_pool2d(x, pool).flatten(1)


def standardization(x: Tensor) -> tuple[Tensor, Tensor]:
    """(F,), (F,) float64: the per-feature mean and spread `fit_linear` standardizes (N, F) features with."""
    return x.double().mean(0), x.double().std(0).clamp_min(1e-6)


def fit_linear(x: Tensor, y: Tensor, n_classes: int, l2: float = 1e-2, max_iter: int = 200) -> nn.Linear:
    """Multinomial logistic regression on standardized features, fitted full-batch with L-BFGS; the
    standardization is folded into the returned float64 layer, which reads `x` itself."""
    mean, std = standardization(x)
    zd = (x.double() - mean) / std
    lin = nn.Linear(x.shape[1], n_classes).double()
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(zd), y) + l2 * lin.weight.square().sum() / 2
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():  # W ((x - mean) / std) + b = (W / std) x + (b - (W / std) mean)
        lin.weight /= std
        lin.bias -= lin.weight @ mean
    return lin.requires_grad_(False)


def fit_logistic(x: Tensor, y: Tensor, n_classes: int, l2: float = 1e-2, max_iter: int = 200) -> Callable[[Tensor], Tensor]:
    """`fit_linear`'s classifier as a predict function: features (N, F) -> classes (N,)."""
    lin = fit_linear(x, y, n_classes, l2, max_iter)
    return lambda new: lin(new.double()).argmax(1)


def select_and_fit(x: Tensor, y: Tensor, groups: list[str], n_classes: int,
                   l2_grid: tuple[float, ...] = L2_GRID) -> tuple[nn.Linear, float, float]:
    """The L2 penalty with the best balanced accuracy on a grouped hold-out of a quarter of the
    training pieces, then a fit on all of them. Returns (`fit_linear`'s layer, chosen l2, its
    hold-out score)."""
    hold = grouped_split(groups, 0.25, salt="probe-inner:")
    fit_side = ~hold
    if hold.all() or not hold.any() or len(y[fit_side].unique()) < 2:
        return fit_linear(x, y, n_classes, l2_grid[0]), l2_grid[0], float("nan")
    # scored with one penalty too (`--l2`): the score is what picks a model's headline feature set
    inner = [scores(fit_logistic(x[fit_side], y[fit_side], n_classes, l2)(x[hold]), y[hold])["balanced_accuracy"]
             for l2 in l2_grid]
    best = int(np.argmax(inner))
    return fit_linear(x, y, n_classes, l2_grid[best]), l2_grid[best], inner[best]


@dataclass
class Model:
    """An encoder row of the table: a trained encoder or its random-initialisation twin."""

    name: str
    encoder: nn.Module
    config: Config
    weights: Path | None = None  # the trained encoder's file (None: a random twin)


def load_models(checkpoints: list[str | os.PathLike], random_baseline: bool = True) -> list[Model]:
    """The runs' encoders (and their twins), each named by its config name, or by its path where
    two runs share one (seeds of a preset in other out_dirs): rows are keyed by name."""
    loaded = []
    for ck in checkpoints:
        resolved = resolve_checkpoint(ck)
        loaded.append((ck, resolved, *load_encoder(resolved)))
    paths = [r.encoder.path.resolve() for _, r, _, _ in loaded]
    twice = {str(p) for p in paths if paths.count(p) > 1}
    if twice:
        raise ValueError(f"the encoder {sorted(twice)[0]} is given twice; give each run once")
    names = [cfg.name for *_, cfg in loaded]
    models = []
    for ck, resolved, encoder, cfg in loaded:
        name = f"{cfg.name} ({cfg.model.encoder})" if names.count(cfg.name) == 1 else f"{ck} ({cfg.model.encoder})"
        models.append(Model(name, encoder, cfg, resolved.encoder.path))
        if random_baseline:
            models.append(Model(name + TWIN, initial_encoder(pretraining_config(resolved)), cfg))
    return models


def probe_task(task: Task, crops: Crops, feature_sets: dict[str, dict[str, Tensor]], l2_grid: tuple[float, ...]) -> dict[str, Any]:
    """Every feature set of `feature_sets` ({row name: {feature name: (N_crops, F)}}) on one task."""
    train_rows, test_rows = crops.rows(task.train), crops.rows(task.test)
    label = {p["piece_id"]: label_of(p, task.name) for p in task.train + task.test}
    y_all = torch.tensor([task.classes.index(label[pid]) if pid in label else -1 for pid in crops.pieces])  # (N,)
    for side, rows in (("training", train_rows), ("test", test_rows)):
        if not rows:  # its pieces are all too short or too silent for a crop (`piece_crops`)
            raise ValueError(f"task {task.name!r}: no {side} piece has a crop with notes; prepare longer pieces "
                             f"or leave the task out (--label)")
    tr, te = torch.tensor(train_rows, dtype=torch.long), torch.tensor(test_rows, dtype=torch.long)
    y_tr, y_te = y_all[tr], y_all[te]
    work = {p["piece_id"]: piece_work(p) for p in task.train}
    groups = [work[crops.pieces[i]] for i in train_rows]  # the inner hold-out keeps a work on one side
    majority = int(torch.bincount(y_tr, minlength=len(task.classes)).argmax())
    preds = [torch.full_like(y_te, majority)]  # (N_test,) per row, in the order of `rows`
    rows = [{"model": "majority class", "features": f"always {task.classes[majority]!r}", "dim": 0,
             **scores(preds[0], y_te)}]
    for model, sets in feature_sets.items():
        model_rows = []
        for name, f in sets.items():
            lin, l2, inner = select_and_fit(f[tr], y_tr, groups, len(task.classes), l2_grid)
            preds.append(lin(f[te].double()).argmax(1))
            model_rows.append({"model": model, "features": name, "dim": f.shape[1], "l2": l2, "holdout_bacc": inner,
                               **scores(preds[-1], y_te)})
        # The headline: the feature set the training side's hold-out prefers (never the test side).
        best = max(model_rows, key=lambda r: -1.0 if np.isnan(r["holdout_bacc"]) else r["holdout_bacc"])
        best["headline"] = True
        rows += model_rows
    test_work = {p["piece_id"]: piece_work(p) for p in task.test}
    boot = bootstrap_balanced_accuracy(torch.stack(preds) == y_te, y_te, [test_work[crops.pieces[i]] for i in test_rows],
                                       N_BOOT)  # (N_BOOT, rows)
    for r, b in zip(rows, boot.T):
        r["ci95"] = interval(b)
    return {"task": task.name, "classes": task.classes, "train_crops": len(train_rows), "test_crops": len(test_rows),
            "train_pieces": len({crops.pieces[i] for i in train_rows}),
            "test_pieces": len({crops.pieces[i] for i in test_rows}), "rows": rows,
            "differences": [{"task": task.name, **d} for d in differences(rows, boot)]}


def interval(samples: Tensor) -> list[float]:
    """The central 95 % of bootstrap samples (1-D)."""
    return [float(v) for v in torch.quantile(samples, torch.tensor([0.025, 0.975], dtype=samples.dtype))]


def differences(rows: list[dict[str, Any]], boot: Tensor) -> list[dict[str, Any]]:
    """Each trained encoder's headline against its random twin's headline and against the pixel and
    descriptor baselines: the difference of balanced accuracy on the test side, with its 95 % interval
    over the same resamples of the test works (paired: both sides scored on each resample).
    boot: (n_boot, len(rows))."""
    head = {r["model"]: i for i, r in enumerate(rows) if r.get("headline") or r["model"] in BASELINES[1:]}
    out = []
    for model, i in head.items():
        if model in BASELINES or model.endswith(TWIN):
            continue
        for other in (model + TWIN, *BASELINES[1:]):
            if other in head:
                j = head[other]
                out.append({"model": model, "against": other,
                            "difference": rows[i]["balanced_accuracy"] - rows[j]["balanced_accuracy"],
                            "ci95": interval(boot[:, i] - boot[:, j])})
    return out


def probe(checkpoints: list[str | os.PathLike], cache_dir: str | os.PathLike, tasks: list[str] | None = None,
          classes: list[str] | None = None, level: int | str | None = None, test_fraction: float | None = None,
          crops_per_piece: int = 4, max_pieces_per_class: int = 150, max_classes: int = 8,
          l2: float | None = None, random_baseline: bool = True, min_pieces: int = 20) -> dict[str, Any]:
    """The probe suite of every checkpoint (and its random twin) on the same crops and split,
    with the majority, raw-pixel and descriptor baselines. `level`: only that level's features
    (an index, 0 = coarsest, or 'all' for the concatenation); `l2`: a fixed penalty instead of
    the hold-out choice; `test_fraction`: default the first run's `data.val_fraction`; a class
    needs `min_pieces` training pieces and a fifth of that (at least 2) test pieces."""
    if l2 is not None and not 0 < l2 < math.inf:
        raise ValueError(f"the L2 penalty must be positive and finite, got {l2}")
    if crops_per_piece < 1 or max_pieces_per_class < 1 or max_classes < 2 or min_pieces < 1:
        raise ValueError(f"need crops_per_piece, max_pieces_per_class, min_pieces >= 1 and max_classes >= 2; got "
                         f"{crops_per_piece}, {max_pieces_per_class}, {min_pieces}, {max_classes}")
    models = load_models(checkpoints, random_baseline)
    for m in models:
        check_time_grid(m.config, Path(cache_dir), m.weights, overrides=False)
        levels = len(m.encoder.feature_info)
        if level not in (None, "all") and not 0 <= int(level) < levels:
            raise ValueError(f"level {level} is out of range for {m.name}: its levels are 0..{levels - 1} (0 = coarsest), "
                             f"or 'all'")
    widths = {m.encoder.img_size[1] for m in models}
    if len(widths) > 1:
        raise ValueError(f"the runs read crops of different widths {sorted(widths)}; probe them separately")
    width = widths.pop()
    test_fraction = test_fraction if test_fraction is not None else models[0].config.data.val_fraction
    trained_on = [m.name for m in models if tests_on_training_pieces(m.config, cache_dir, test_fraction)]
    if trained_on:  # the test side is the works hashed under test_fraction: on their own cache, some trained these runs
        raise ValueError(f"--test-fraction {test_fraction} is above the data.val_fraction of {', '.join(trained_on)}, "
                         f"so some test pieces were training pieces of it; use at most the smallest val_fraction "
                         f"of the runs, or probe them separately")
    found = find_tasks(load_index(cache_dir), test_fraction, tasks, classes, min_pieces, max(min_pieces // 5, 2),
                       max_classes, max_pieces_per_class)
    if not found:
        raise ValueError(f"no task in {cache_dir} has two classes with enough pieces on both sides of the split "
                         f"(tasks tried: {', '.join(tasks or TASKS)}); prepare a labelled corpus, e.g. "
                         f"`midi-rae prepare --collections {' '.join(BUNDLED_TASK)} --cache-dir DIR`, "
                         f"or raise --test-fraction (up to the runs' data.val_fraction)")
    crops = piece_crops(cache_dir, [p for t in found for p in t.train + t.test], width, crops_per_piece)
    feature_sets: dict[str, dict[str, Tensor]] = {
        "raw pixels": {"4x4 avg-pooled": pixel_features(crops.x)},
        "descriptors": {"hand-crafted": descriptors(crops.x)},
    }
    for m in models:
        x = crops.x[:, : m.encoder.in_chans]
        if x.shape[1] < m.encoder.in_chans:
            raise ValueError(f"{m.name} reads {m.encoder.in_chans} channels, the cache {cache_dir} holds {x.shape[1]}")
        feats = level_features(m.encoder, x)
        if level is not None:
            want = "all" if str(level) == "all" else f"L{int(level)}"
            feats = {k: v for k, v in feats.items() if k.split()[0] == want}
        feature_sets[m.name] = feats
    grid = (l2,) if l2 is not None else L2_GRID
    return {"cache": str(cache_dir), "width": width, "test_fraction": test_fraction,
            "models": [m.name for m in models],
            "tasks": [probe_task(t, crops, feature_sets, grid) for t in found]}


def headline(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per task: the balanced accuracy of each baseline and of each model's headline feature set."""
    out = []
    for t in result["tasks"]:
        row: dict[str, Any] = {"task": t["task"], "classes": len(t["classes"])}
        for r in t["rows"]:
            if r["model"] in BASELINES or r.get("headline"):
                row[r["model"]] = r["balanced_accuracy"]
        out.append(row)
    return out


def headline_table(models: list[str], heads: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of `headline`'s rows: a task per row, the baselines and `models` as columns."""
    names = [*BASELINES, *models]
    lines = ["| task | classes | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    return lines + [f"| {h['task']} | {h['classes']} | " + " | ".join(f"{h.get(n, float('nan')):.3f}" for n in names)
                    + " |" for h in heads]


def differences_table(diffs: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of `differences`' rows (every task's)."""
    return ["| task | encoder | against | difference | 95 % interval |", "|---|---|---|---|---|",
            *(f"| {d['task']} | {d['model']} | {d['against']} | {d['difference']:+.3f} | "
              f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] |" for d in diffs)]


def table(result: dict[str, Any]) -> str:
    """The headline table, the paired differences, then one table per task with every row."""
    lines = [f"Probe suite on {result['cache']} ({result['width']}-step crops, test = the pieces hashed into the "
             f"{result['test_fraction']:g} held-out share). Balanced accuracy on the test pieces; each encoder's "
             "feature set chosen on a hold-out of the training pieces.", "",
             *headline_table(result["models"], headline(result))]
    diffs = [d for t in result["tasks"] for d in t["differences"]]
    if diffs:
        lines += ["", f"Each encoder's headline against its random twin and the simple baselines: difference of "
                  f"balanced accuracy, 95 % interval over {N_BOOT} resamples of the test works (paired).", "",
                  *differences_table(diffs)]
    for t in result["tasks"]:
        lines += ["", f"### {t['task']} ({', '.join(t['classes'])}): {t['train_crops']} training crops from "
                  f"{t['train_pieces']} pieces, {t['test_crops']} test crops from {t['test_pieces']} other pieces", "",
                  "| model | features | dim | L2 | hold-out bal. acc. | accuracy | balanced accuracy | 95 % interval |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in t["rows"]:
            star = " **(headline)**" if r.get("headline") else ""
            l2 = f"{r['l2']:g}" if "l2" in r else "-"
            inner = f"{r['holdout_bacc']:.3f}" if "holdout_bacc" in r and not np.isnan(r["holdout_bacc"]) else "-"
            lines.append(f"| {r['model']} | {r['features']}{star} | {r['dim']} | {l2} | {inner} | "
                         f"{r['accuracy']:.3f} | {r['balanced_accuracy']:.3f} | "
                         f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] |")
    return "\n".join(lines)


def figure(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Grouped bars: balanced accuracy per task for the baselines and each model's headline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = headline(result)
    names = [*BASELINES, *result["models"]]
    fig, ax = plt.subplots(figsize=(4.2 + 1.6 * len(heads), 3.6))
    w = 0.8 / len(names)
    for k, n in enumerate(names):
        ax.bar([i + k * w for i in range(len(heads))], [h.get(n, np.nan) for h in heads], w, label=n)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(heads))], [f"{h['task']}\n({h['classes']} classes)" for h in heads])
    ax.set_ylabel("balanced accuracy (test pieces)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def check_out_name(path: Path) -> None:
    """Refuse an output name whose .md or .png twin would be the JSON file itself."""
    if path.suffix.lower() != ".json":
        raise ValueError(f"-o {path}: give a .json name (e.g. {path.with_suffix('.json')}); the table and the figure "
                         f"are written beside it as .md and .png")


def write(result: dict[str, Any], path: str | os.PathLike) -> None:
    """`result` as JSON at `path` (a .json name: the table goes beside it as .md, the figure as .png)."""
    path = Path(path)
    check_out_name(path)
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    atomic_write_text(path.with_suffix(".md"), table(result) + "\n")
    figure(result, path.with_suffix(".png"))
