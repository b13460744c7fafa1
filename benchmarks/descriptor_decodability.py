"""Which hand-crafted descriptors can be read linearly from an encoder's embeddings?

The probe suite says how well embeddings classify; this says what musical content they hold, in the
terms of the descriptor baseline (`midi_rae.descriptors`): ridge regression from the pooled
embeddings of the probe suite's crops to each crop's descriptors, fitted on the training works,
scored as R^2 on the held-out works, per descriptor group. A group the embeddings hold poorly is
where the descriptor baseline keeps its lead. A second table says which groups the probe tasks
need: each task probed (as `midi-rae probe` does) on each descriptor group alone.

    PYTHONPATH=. python benchmarks/descriptor_decodability.py runs/A runs/B --cache-dir CACHE

Every run is read with its random-initialisation twin, and the raw-pixel baseline beside them.
The ridge penalty is chosen on a grouped hold-out of the training works, never on the test works.
"""
from __future__ import annotations

import argparse

import torch
from torch import Tensor

from midi_rae.cache import load_index
from midi_rae.descriptors import NAMES, descriptors
from midi_rae.labels import Crops, Task, find_tasks, grouped_split, label_of, piece_crops
from midi_rae.metrics import scores
from midi_rae.probes import level_features, load_models, pixel_features, select_and_fit, standardization

GROUPS = {  # descriptor group -> its columns (prefixes of `NAMES`)
    "pitch classes (key-relative)": ("pc_rel", "key_corr"),
    "melodic intervals": ("interval",),
    "inter-onset intervals": ("ioi",),
    "onset autocorrelation": ("onset_autocorr",),
    "scalars (density, polyphony, range)": tuple(NAMES[NAMES.index("onset_density"):]),
}
RIDGE_GRID = (1.0, 10.0, 100.0, 1000.0)


def ridge(x: Tensor, y: Tensor, lam: float) -> Tensor:
    """(N, F), (N, T) float64, standardised -> (F + 1, T) weights with a bias row (not penalised
    apart from the others: its penalty is negligible against N)."""
    a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    return torch.linalg.solve(a.T @ a + lam * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y)


def predict(x: Tensor, w: Tensor) -> Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ w


def group_r2(pred: Tensor, y: Tensor, columns: list[int]) -> float:
    """R^2 of a descriptor group, its columns pooled: 1 - summed squared error / summed variance."""
    err = (pred[:, columns] - y[:, columns]).square().sum()
    return float(1 - err / (y[:, columns] - y[:, columns].mean(0)).square().sum().clamp_min(1e-12))


def decodability(features: Tensor, target: Tensor, test: Tensor, groups: list[str]) -> dict[str, float]:
    """R^2 per descriptor group on the `test` rows, the ridge penalty chosen on a grouped hold-out
    of the others. Columns constant on the training side are left out (nothing to explain)."""
    train = ~test
    mean, std = standardization(features[train])  # the probe suite's own
    x, y = (features.double() - mean) / std, target.double()
    keep = y[train].std(0) > 1e-9
    y = (y - y[train].mean(0)) / y[train].std(0).clamp_min(1e-9)
    cols = {g: [i for i, n in enumerate(NAMES) if keep[i] and n.startswith(GROUPS[g])] for g in GROUPS}
    hold = grouped_split([g for g, t in zip(groups, train) if t], 0.25, salt="decodability-inner:")
    xt, yt = x[train], y[train]
    inner = [((predict(xt[hold], ridge(xt[~hold], yt[~hold], lam)) - yt[hold])[:, keep]).square().mean()
             for lam in RIDGE_GRID]
    lam = RIDGE_GRID[int(torch.stack(inner).argmin())]
    pred = predict(x[test], ridge(xt, yt, lam))
    return {g: group_r2(pred, y[test], c) for g, c in cols.items()}


def group_probes(tasks: list[Task], crops: Crops, target: Tensor) -> list[str]:
    """Markdown rows: each task's balanced accuracy on its test works from each descriptor group alone
    (and all of them), L2 chosen on a grouped hold-out of the training works as in the probe suite."""
    rows = []
    for t in tasks:
        label = {p["piece_id"]: t.classes.index(label_of(p, t.name)) for p in t.train + t.test}
        test_ids = {p["piece_id"] for p in t.test}
        rows_of = [i for i, p in enumerate(crops.pieces) if p in label]
        ids = [crops.pieces[i] for i in rows_of]
        y = torch.tensor([label[p] for p in ids])
        test = torch.tensor([p in test_ids for p in ids])
        out = []
        for prefixes in [tuple(NAMES)] + list(GROUPS.values()):
            x = target[rows_of][:, [i for i, n in enumerate(NAMES) if n.startswith(prefixes)]]
            lin, _, _ = select_and_fit(x[~test], y[~test], [p for p, s in zip(ids, test) if not s], len(t.classes))
            out.append(scores(lin(x[test].double()).argmax(1), y[test])["balanced_accuracy"])
        rows.append(f"| {t.name} | " + " | ".join(f"{v:.3f}" for v in out) + " |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders or encoder checkpoints")
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--crops-per-piece", type=int, default=2)
    ap.add_argument("--features", nargs="+", default=["all non-empty", "all non-empty + self-sim"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = load_models(args.runs)
    fraction = models[0].config.data.val_fraction
    tasks = find_tasks(load_index(args.cache_dir), fraction)
    test_ids = {p["piece_id"] for t in tasks for p in t.test}
    crops = piece_crops(args.cache_dir, [p for t in tasks for p in t.train + t.test],
                        models[0].encoder.img_size[1], args.crops_per_piece)
    test = torch.tensor([p in test_ids for p in crops.pieces])
    target = descriptors(crops.x)
    print(f"{len(crops.x)} crops of {len(crops.by_piece)} pieces ({int(test.sum())} test crops); R^2 on the test works")
    print("| features | " + " | ".join(GROUPS) + " |")
    print("|---|" + "---:|" * len(GROUPS))
    rows = [("raw pixels (4x4 avg-pooled)", pixel_features(crops.x))]
    for m in models:
        feats = level_features(m.encoder, crops.x[:, : m.encoder.in_chans])
        rows += [(f"{m.name}: {name}", feats[name]) for name in args.features if name in feats]
    for name, f in rows:
        r2 = decodability(f, target, test, crops.pieces)
        print(f"| {name} | " + " | ".join(f"{r2[g]:.3f}" for g in GROUPS) + " |", flush=True)
    print("\nBalanced accuracy of each probe task on its test works from descriptor groups alone:")
    print("| task | all descriptors | " + " | ".join(GROUPS) + " |")
    print("|---|---:|" + "---:|" * len(GROUPS))
    print("\n".join(group_probes(tasks, crops, target)))


if __name__ == "__main__":
    main()
