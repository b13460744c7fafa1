"""Which descriptor groups carry a probe task, and how much of each group a run's levels hold.

Two tables for one task of the probe suite (same crops, split and L2 choice as `midi-rae probe`):
1. the task's balanced accuracy on the test pieces from each group of the hand-crafted
   descriptors alone (`midi_rae.descriptors`), from all of them, and from all of them computed
   on the frame channel only (what a one-channel encoder sees: repeated notes merged);
2. for each run, the R^2 on the test pieces of a ridge regression from its 'all non-empty'
   features to each group's standardised descriptors (fitted on the training pieces): how much
   of each group the levels hold linearly, which is what the descriptor objective asks of them.

    PYTHONPATH=. python benchmarks/descriptor_groups.py runs/A [runs/B ...] --cache-dir CACHE --task time_signature
"""
from __future__ import annotations

import argparse

import torch

from midi_rae.cache import load_index
from midi_rae.descriptors import NAMES, RHYTHM, descriptors
from midi_rae.labels import find_tasks, piece_crops
from midi_rae.probes import L2_GRID, level_features, probe_task
from midi_rae.runs import load_encoder

GROUPS = {"pitch classes": "pc_rel_ key_corr_", "intervals": "interval_", "inter-onset intervals": "ioi_",
          "onset autocorrelation": "onset_autocorr_",
          "scalars": "onset_density sounding_density polyphony_ pitch_low pitch_high pitch_range pitch_centroid "
                     "pitch_spread note_length pitch_classes_used"}


def columns(prefixes: str) -> list[int]:
    """Indices of the descriptor names starting with any of the space-separated prefixes."""
    return [i for i, n in enumerate(NAMES) if n.startswith(tuple(prefixes.split()))]


def ridge_r2(x_tr: torch.Tensor, y_tr: torch.Tensor, x_te: torch.Tensor, y_te: torch.Tensor,
             l2: float = 10.0) -> torch.Tensor:
    """(2, F): per target column, the residual and the total sum of squares on the test rows of a
    ridge fit on standardised features and targets (training-side statistics)."""
    mx, sx = x_tr.mean(0), x_tr.std(0).clamp_min(1e-6)
    my, sy = y_tr.mean(0), y_tr.std(0).clamp_min(1e-6)
    a, b = (x_tr - mx) / sx, (y_tr - my) / sy
    w = torch.linalg.solve(a.T @ a + l2 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ b)  # (D, F)
    pred = ((x_te - mx) / sx) @ w
    target = (y_te - my) / sy
    return torch.stack([((pred - target) ** 2).sum(0), ((target - target.mean(0)) ** 2).sum(0)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*")
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--task", default="time_signature")
    p.add_argument("--test-fraction", type=float, default=0.05)  # the presets' data.val_fraction
    p.add_argument("--crops-per-piece", type=int, default=2)  # as `run`'s summary and RESULTS' probe commands
    args = p.parse_args()

    # the suite's defaults: at most 8 classes, 20 training pieces a class (4 test), 150 training pieces a class
    (task,) = find_tasks(load_index(args.cache_dir), args.test_fraction, [args.task], None, 20, 4, 8, 150)
    crops = piece_crops(args.cache_dir, task.train + task.test, 128, args.crops_per_piece)
    d = descriptors(crops.x).double()  # (N, F), frame and onset channels
    sets = {g: d[:, columns(prefixes)] for g, prefixes in GROUPS.items()}
    sets |= {"rhythm (IOI + autocorrelation)": d[:, RHYTHM], "all": d,
             "all, frame channel only": descriptors(crops.x[:, :1]).double()}
    result = probe_task(task, crops, {"descriptors": sets}, L2_GRID)
    print(f"{task.name}: {result['train_crops']} training crops, {result['test_crops']} test crops\n")
    print("| descriptors | dim | balanced accuracy |\n|---|---|---|")
    for r in result["rows"][1:]:
        print(f"| {r['features']} | {r['dim']} | {r['balanced_accuracy']:.3f} |")

    tr, te = (torch.tensor(crops.rows(side), dtype=torch.long) for side in (task.train, task.test))
    if args.runs:
        print("\nR^2 on the test pieces of a ridge regression (L2 10) from 'all non-empty' to each group\n")
        header = ["run", *GROUPS, "worst autocorrelation lags (lag: R^2)"]
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for run in args.runs:
        encoder, cfg = load_encoder(run)
        x = level_features(encoder, crops.x[:, :encoder.in_chans])["all non-empty"].double()
        ss = ridge_r2(x[tr], d[tr], x[te], d[te])  # (2, F)
        r2 = {g: 1 - float(ss[0, columns(prefixes)].sum() / ss[1, columns(prefixes)].sum()) for g, prefixes in GROUPS.items()}
        lags = columns("onset_autocorr_")
        per_lag = 1 - ss[0, lags] / ss[1, lags].clamp_min(1e-12)
        worst = sorted(range(len(lags)), key=lambda k: float(per_lag[k]))[:4]
        print(f"| {cfg.name} | " + " | ".join(f"{v:.3f}" for v in r2.values()) + " | "
              + ", ".join(f"{k + 1}: {float(per_lag[k]):.2f}" for k in worst) + " |")


if __name__ == "__main__":
    main()
