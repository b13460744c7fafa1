"""`midi-rae finetune`: supervised fine-tuning of a run's encoder with a classification head on a
label of the cache metadata (`stages.finetune`), or of the same encoder from its random
initialisation (`--scratch`, the baseline at the same budget).

The head pools one level (`--level`, 0 = coarsest, the last stage's output; the mean over its
tokens, or over the non-empty ones with `finetune.pool=non-empty`), then LayerNorm and Linear;
`--level all` pools every level, each with its own LayerNorm, into one Linear (the probe's
headline features).
The split is the probe suite's (`midi-rae probe`): the same classes, training pieces and test
pieces, grouped by work by a hash of the work, at the run's `data.val_fraction` (the pieces
pretraining never saw), and the same fixed test crops; so `midi-rae probe RUN --label LABEL`
scores the linear probe on the very crops the fine-tuned model is scored on. Training draws
random crops of the training pieces (or, with `finetune.train_crops=start`, their fixed crops
from each piece's start, the probe's), less a grouped tenth (`finetune.val_fraction`) that
validates and picks `checkpoints/best`; the final weights are scored on the test pieces.

The head starts as the linear probe of the initial encoder's features on the training pieces'
fixed crops (`finetune.head_init=probe`, LP-FT; `random`: a fresh head). Options of the
`finetune` and `finetune_train` config sections: layer-wise lr decay
(`finetune_train.layer_decay`, default 0.75), stochastic depth (`model.drop_path_rate`), label
smoothing (`finetune.label_smoothing`, default 0.1), steps and learning rate
(`finetune_train.max_steps`, `finetune_train.lr`, default 1e-4).

Stage folder (default `RUN/finetune-LABEL`, `-scratch` appended for the baseline): `config.yaml`,
`metrics.jsonl`, `checkpoints/`, `classifier.safetensors` (encoder + head), `encoder.safetensors`,
`summary.json`, `summary.md` and `confusion.png` (the confusion matrix on the test crops).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

from midi_rae.config import Config, describe, load_config, resolve_config_path, with_overrides
from midi_rae.plots import confusion_figure
from midi_rae.runs import resolve_checkpoint, transfer_config
from midi_rae.stages import finetune
from midi_rae.utils import atomic_write_text


def markdown(r: dict[str, Any]) -> str:
    t, final = r["test"], r["final"]
    start = "random initialisation (--scratch)" if r["scratch"] else "the run's encoder"
    head = "all levels" if r["level"] is None else f"level {r['level']}"
    lines = [f"# Fine-tuning on {r['label']} ({len(r['classes'])} classes), from {start}", "",
             f"Head on {head} ({r['pool']} pooling); {final['step']} steps in {final['seconds']:.0f} s; "
             f"{r['train_pieces']} training pieces, {r['val_pieces']} validation pieces, test: {r['test_crops']} "
             f"crops of {r['test_pieces']} other pieces ({r['cache']}).", "",
             "| split | accuracy | balanced accuracy |", "|---|---|---|",
             f"| validation (best: step {final['best_step']}) | {final.get('val_accuracy', float('nan')):.3f} | "
             f"{final.get('val_balanced_accuracy', float('nan')):.3f} |",
             f"| **test (final weights)** | {t['accuracy']:.3f} | **{t['balanced_accuracy']:.3f}** |", "",
             "Confusion matrix on the test crops (rows: true class, columns: predicted):", "",
             "| true \\ predicted | " + " | ".join(r["classes"]) + " |", "|---" * (len(r["classes"]) + 1) + "|"]
    lines += [f"| {c} | " + " | ".join(map(str, row)) + " |" for c, row in zip(r["classes"], t["confusion"])]
    return "\n".join(lines)


def write_summary(r: dict[str, Any], stage_dir: Path) -> None:
    atomic_write_text(stage_dir / "summary.json", json.dumps(r, indent=1) + "\n")
    atomic_write_text(stage_dir / "summary.md", markdown(r) + "\n")
    confusion_figure(r["test"]["confusion"], r["classes"], stage_dir / "confusion.png",
                     f"{r['label']}, test crops: balanced accuracy {r['test']['balanced_accuracy']:.3f}")


def add_finetune(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser("finetune", help="fine-tune an encoder with a classification head on a metadata label "
                       "(or train it from scratch: the baseline)", description=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="config fields (KEY=VALUE):\n" + describe())
    p.add_argument("checkpoint", nargs="?", metavar="RUN", help="run folder or encoder weights to start from "
                   "(with --scratch: its architecture only)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. finetune_train.max_steps=500 model.drop_path_rate=0.1")
    p.add_argument("--label", help="the metadata label to predict (finetune.label; default collection)")
    p.add_argument("--level", help="the level the head pools, 0 = coarsest, or 'all': every level concatenated "
                   "(finetune.level; default 0)")
    p.add_argument("--scratch", action="store_true", help="start from the random initialisation (finetune.scratch)")
    p.add_argument("-c", "--config", help="with --scratch and no RUN: the preset (or YAML) of the encoder to build")
    p.add_argument("--cache-dir", help="labelled roll cache (default: the one the run trained on)")
    p.add_argument("--window-size", type=int, help="run the encoder at this attention window (Swin)")
    p.add_argument("--crop-width", type=int, help="train on crops of this width (a transfer of the run's geometry)")
    p.add_argument("-o", "--out", help="the stage folder (default: RUN/finetune-LABEL, -scratch appended with --scratch)")
    p.add_argument("--resume", action="store_true", help="continue from the stage folder's latest checkpoint, exactly")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")

    def run(args: argparse.Namespace) -> int:
        # A KEY=VALUE given first lands in the RUN slot: give it back to the overrides.
        if args.checkpoint and "=" in args.checkpoint and not Path(args.checkpoint).exists():
            args.overrides, args.checkpoint = [args.checkpoint, *args.overrides], None
        ck = None
        if args.checkpoint:
            if args.config:
                raise ValueError("give RUN or -c PRESET, not both: a run's encoder brings its own config")
            ck = resolve_checkpoint(args.checkpoint)
            moved = args.window_size is not None or args.crop_width is not None
            base: Config = transfer_config(ck.config, args.window_size, args.crop_width) if moved else ck.config
        elif args.scratch:
            base = load_config(resolve_config_path(args.config or "quickstart"))
        else:
            raise ValueError("give the RUN to fine-tune (a run folder or encoder weights), or --scratch -c PRESET "
                             "for an encoder from its random initialisation")
        flags = [f"finetune.label={args.label}"] if args.label else []
        if args.level is not None:
            if args.level != "all" and not args.level.isdigit():
                raise ValueError(f"--level takes a level number (0 = coarsest) or 'all', got {args.level!r}")
            flags.append(f"finetune.level={'null' if args.level == 'all' else args.level}")
        flags += ["finetune.scratch=true"] if args.scratch else []
        flags += [f"data.cache_dir={Path(args.cache_dir).resolve()}"] if args.cache_dir else []
        cfg = with_overrides(base, [*flags, *args.overrides])
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        name = f"finetune-{cfg.finetune.label}" + ("-scratch" if cfg.finetune.scratch else "")
        if args.out:
            stage_dir = Path(args.out)
        elif ck is not None:
            stage_dir = (ck.run_dir or ck.encoder.path.parent) / name
        else:
            stage_dir = Path(cfg.out_dir) / cfg.name / name
        result = finetune(cfg, stage_dir, ck, args.resume)
        if result:
            write_summary(result, stage_dir)
            print(markdown(result))
            print(f"[finetune] {stage_dir / 'summary.md'}, {stage_dir / 'confusion.png'}", flush=True)
        return 0

    return run
