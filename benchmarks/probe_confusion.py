"""Where a probe task's gap to the descriptors lies: per-class recall and confusion matrices.

The probe suite (`midi-rae probe`) reports one balanced accuracy per feature set. This fits the
same probe (same crops, split, L2 choice on the grouped hold-out of the training pieces) on the
descriptors and on each run's features (default: 'all non-empty + self-sim', the suite's usual
headline) for one task, and prints on the test pieces, per class: the number of test crops, the
recall of each row, and each row's confusion matrix (true class per line, predicted per column).

    PYTHONPATH=. python benchmarks/probe_confusion.py runs/A [runs/B ...] --cache-dir CACHE --task time_signature
"""
from __future__ import annotations

import argparse

import torch

from midi_rae.cache import load_index, piece_work
from midi_rae.descriptors import descriptors
from midi_rae.labels import find_tasks, label_of, piece_crops
from midi_rae.probes import level_features, select_and_fit
from midi_rae.runs import load_encoder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--task", default="time_signature")
    p.add_argument("--features", default="all non-empty + self-sim", help="the runs' feature set (level_features key)")
    p.add_argument("--crops-per-piece", type=int, default=2)  # as `run`'s summary and RESULTS' probe commands
    args = p.parse_args()

    encoders = [load_encoder(r) for r in args.runs]
    test_fraction = encoders[0][1].data.val_fraction  # as the suite: the first run's validation share
    # the suite's defaults: at most 8 classes, 20 training pieces a class (4 test), 150 training pieces a class
    (task,) = find_tasks(load_index(args.cache_dir), test_fraction, [args.task], None, 20, 4, 8, 150)
    crops = piece_crops(args.cache_dir, task.train + task.test, encoders[0][0].img_size[1], args.crops_per_piece)
    tr, te = (torch.tensor(crops.rows(side), dtype=torch.long) for side in (task.train, task.test))
    label = {p["piece_id"]: task.classes.index(label_of(p, task.name)) for p in task.train + task.test}
    y = torch.tensor([label.get(pid, -1) for pid in crops.pieces])  # (N,)
    work = {p["piece_id"]: piece_work(p) for p in task.train}
    groups = [work[crops.pieces[i]] for i in tr.tolist()]

    features = {"descriptors": descriptors(crops.x)}
    for encoder, cfg in encoders:
        features[cfg.name] = level_features(encoder, crops.x[:, : encoder.in_chans])[args.features]
    k = len(task.classes)
    recalls, confusions = {}, {}
    for name, f in features.items():
        lin, l2, _ = select_and_fit(f[tr], y[tr], groups, k)
        pred = lin(f[te].double()).argmax(1)
        conf = torch.zeros(k, k, dtype=torch.long)
        conf.index_put_((y[te], pred), torch.ones_like(pred), accumulate=True)
        confusions[name] = conf
        recalls[name] = conf.diag().double() / conf.sum(1).clamp(min=1)
        print(f"{name}: balanced accuracy {recalls[name].mean():.3f} (L2 {l2:g})")

    counts = torch.bincount(y[te], minlength=k)
    print(f"\n{task.name}: {len(tr)} training crops, {len(te)} test crops\n")
    print("| class | test crops | " + " | ".join(features) + " |")
    print("|---|---:|" + "---:|" * len(features))
    for c, cls in enumerate(task.classes):
        print(f"| {cls} | {int(counts[c])} | " + " | ".join(f"{float(r[c]):.3f}" for r in recalls.values()) + " |")
    for name, conf in confusions.items():
        print(f"\n{name} (true class per line, predicted per column)\n")
        print("| true \\ predicted | " + " | ".join(task.classes) + " |")
        print("|---|" + "---:|" * k)
        for c, cls in enumerate(task.classes):
            print(f"| {cls} | " + " | ".join(str(int(v)) for v in conf[c]) + " |")


if __name__ == "__main__":
    main()
