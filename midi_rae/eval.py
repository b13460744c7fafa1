"""`midi-rae eval`: reconstruction metrics and figures of a trained run (`midi_rae.evaluate`)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from midi_rae import evaluate
from midi_rae.utils import resolve_device


def add_eval(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser("eval", help="reconstruction metrics (pixel, note onsets) and figures of a trained run",
                       description=evaluate.__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="run folder (runs/<name>) or decoder.safetensors")
    p.add_argument("-o", "--out", help="output folder (default: <run>/eval)")
    p.add_argument("--cache-dir", help="roll cache (default: the run's own data)")
    p.add_argument("--threshold", type=float, help="stated threshold (default: the run's decoder.threshold)")
    p.add_argument("--split", default="val", choices=("val", "train", "all"))
    p.add_argument("--max-items", type=int, help="crops to evaluate (default: data.val_max_items)")
    p.add_argument("--examples", type=int, default=4, help="crops shown in recon.png")
    p.add_argument("--device", default="cpu")

    def run(args: argparse.Namespace) -> int:
        r = evaluate.evaluate(args.checkpoint, args.out, args.cache_dir, args.threshold, args.split, args.max_items,
                              args.examples, device=resolve_device(args.device))
        print(evaluate.markdown(r))
        print(f"\nwritten: {Path(r['figures']['recon']).parent}/metrics.json, metrics.md and figures")
        return 0

    return run
