"""`midi-rae probe`: the probe suite (`midi_rae.probes`) of one or more runs, as a table, JSON and a figure."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from midi_rae import probes
from midi_rae.runs import resolve_cache_dir, resolve_checkpoint


def add_probe(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser("probe", help="the probe suite: linear probes on frozen embeddings for every metadata label, "
                       "against majority, raw pixels, music descriptors and a random encoder",
                       description=probes.__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="run folders or encoder weights; several (e.g. a Swin and a ViT run) make one table")
    p.add_argument("--cache-dir", help="labelled roll cache (default: the cache the first run trained on)")
    p.add_argument("--label", nargs="+", metavar="TASK", help=f"tasks to run (default: every one of {', '.join(probes.TASKS)} "
                   "that the metadata supports)")
    p.add_argument("--classes", nargs="+", metavar="VALUE", help="label values to keep (default: the most frequent)")
    p.add_argument("--level", help="only this level (0 = coarsest) or 'all' (levels concatenated); default: every one")
    p.add_argument("--test-fraction", type=float, help="share of pieces on the test side (default: the run's "
                   "data.val_fraction, so the test pieces are ones the encoder never trained on)")
    p.add_argument("--crops-per-piece", type=int, default=4)
    p.add_argument("--max-pieces-per-class", type=int, default=150, help="training pieces per class (test: a quarter)")
    p.add_argument("--max-classes", type=int, default=8, help="the most frequent classes of a task kept")
    p.add_argument("--min-pieces", type=int, default=20, help="training pieces a class needs (test: a fifth, at least 2)")
    p.add_argument("--l2", type=float, help="a fixed L2 penalty (default: chosen on a hold-out of the training pieces)")
    p.add_argument("--no-random", action="store_true", help="leave out the random-initialisation baseline")
    p.add_argument("-o", "--out", help="write the result as JSON here (and the table beside it as .md, the figure as .png)")

    def run(args: argparse.Namespace) -> int:
        if args.out:  # before minutes of probing, not after: its folder is made, a folder in its place refused
            out = Path(args.out)
            if out.is_dir():
                raise ValueError(f"-o {out} is a folder; give a file name such as {out / 'probe.json'}")
            probes.check_out_name(out)
            out.parent.mkdir(parents=True, exist_ok=True)
        cache = Path(args.cache_dir) if args.cache_dir else resolve_cache_dir(resolve_checkpoint(args.checkpoints[0]).config)
        if args.level not in (None, "all") and not args.level.lstrip("-").isdigit():
            raise ValueError(f"--level must be a level number (0 = coarsest) or 'all', got {args.level!r}")
        level = None if args.level is None else (args.level if args.level == "all" else int(args.level))
        result = probes.probe(args.checkpoints, cache, args.label, args.classes, level, args.test_fraction,
                              args.crops_per_piece, args.max_pieces_per_class, args.max_classes, args.l2, not args.no_random, args.min_pieces)
        print(probes.table(result))
        if args.out:
            probes.write(result, out)
        return 0

    return run
