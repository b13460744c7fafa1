"""`midi-rae train`, `train-decoder` and `run`: the training stages (`midi_rae.stages`) from the
command line, and `run`'s whole job: prepare, both stages, the summary (`evaluate.run_summary`).

Run folder `<out_dir>/<name>/`:

- `pretrain/`: `config.yaml`, `metrics.jsonl`, `checkpoints/`, `encoder.safetensors`, `tb/`
- `decoder/`:  `config.yaml`, `metrics.jsonl`, `checkpoints/`, `decoder.safetensors`, `tb/`
- `recon.png`, `summary.json`, `summary.md` (written by `run`), and `probe.json`, `probe.md`, `probe.png`
  (its probe suite, unless `--no-probe`)
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

from midi_rae.cache import prepare
from midi_rae.config import Config
from midi_rae.distributed import barrier, setup
from midi_rae.evaluate import run_summary
from midi_rae.runs import resolve_cache_dir, roll_settings, stage_dirs
from midi_rae.stages import pretrain, train_decoder
from midi_rae.utils import atomic_write_text


def run_all(cfg: Config, resume: bool = False, workers: int | None = None, probe: bool = True) -> dict[str, Any]:
    """prepare -> pretrain -> decoder -> summary (with the probe suite): the package's main job."""
    t0 = time.time()
    rank = int(os.environ.get("RANK", "0"))
    cache = resolve_cache_dir(cfg)
    if rank == 0:  # other processes wait at the first barrier of pretraining
        summary = prepare(cfg.data.paths or None, cache, roll_settings(cfg),
                          workers=workers, progress=sys.stderr.isatty(), collections=cfg.data.collections)
        if summary.notice:
            print(f"[prepare] {summary.notice}", flush=True)
        print(f"[prepare] {summary.line()} -> {cache} ({time.time() - t0:.0f} s)", flush=True)
        if summary.pieces == 0:
            raise ValueError(f"none of the {summary.files} input files gave a usable piece (reasons in "
                             f"{cache / 'report.txt'}); set data.paths to MIDI, ABC or MusicXML files with notes")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        barrier(setup(cfg.train))
    pretrain(cfg, resume)
    train_decoder(cfg, resume=resume)
    out = {}
    if rank == 0:
        out = run_summary(cfg, probe=probe)
        run_dir = stage_dirs(cfg)[0]
        out["wall_seconds"] = round(time.time() - t0, 1)
        atomic_write_text(run_dir / "summary.json", json.dumps(out, indent=1) + "\n")
        print(f"[run] done in {out['wall_seconds']:.0f} s: {run_dir}/summary.md, {out['figure']}", flush=True)
        print(json.dumps({"pretrain": out["pretrain"], "decoder": out["decoder"]}), flush=True)
    return out


# ----------------------------------------------------------------------------- command line


def _common(p, what: str) -> None:
    from midi_rae.config import describe, preset_dir

    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. model.embed_dim=16 train.lr=3e-4 name=my_run (see below)")
    p.add_argument("-c", "--config", default="quickstart",
                   help=f"YAML preset: a name in configs/ ({', '.join(sorted(p.stem for p in preset_dir().glob('*.yaml')))}) "
                        "or a path (default: quickstart)")
    p.add_argument("--resume", action="store_true",
                   help=f"continue the {what} of this run name from its latest checkpoint (exactly: same batches, "
                        f"same random draws); without a checkpoint, start fresh. Safe to always pass on preemptible machines")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.epilog = ("Run folder: <out_dir>/<name>/ with pretrain/ and decoder/ (config.yaml, metrics.jsonl, checkpoints/, "
                "weights), recon.png, summary.md.\nMulti-GPU / multi-process: torchrun --nproc_per_node=N -m midi_rae "
                f"{p.prog.split()[-1]} ...\n\nconfig fields (KEY=VALUE):\n" + describe())
    p.formatter_class = __import__("argparse").RawDescriptionHelpFormatter


def _config(args) -> Config | None:
    from midi_rae.config import load_config, resolve_config_path

    cfg = load_config(resolve_config_path(args.config), args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return None
    return cfg


def add_train(sub) -> Callable:
    p = sub.add_parser("train", help="pretrain an encoder (SimMIM, masked embedding prediction, LeJEPA, ...)",
                       description="Pretrain an encoder on a prepared roll cache with the objectives whose weights "
                                   "in the config are non-zero. Writes <out_dir>/<name>/pretrain/.")
    _common(p, "pretraining")

    def run(args) -> int:
        cfg = _config(args)
        if cfg is not None:
            pretrain(cfg, args.resume)
        return 0

    return run


def add_train_decoder(sub) -> Callable:
    p = sub.add_parser("train-decoder", help="train a decoder on a frozen (or fine-tuned) pretrained encoder",
                       description="Train a SwinDecoder / ViTDecoder to reconstruct piano rolls from a pretrained "
                                   "encoder's pyramid (frozen unless decoder.finetune_encoder=true). Writes "
                                   "<out_dir>/<name>/decoder/. The encoder's model config is read from its weights file.")
    _common(p, "decoder training")
    p.add_argument("--encoder", metavar="PATH",
                   help="encoder.safetensors (or a folder holding one); default: <out_dir>/<name>/pretrain/encoder.safetensors")

    def run(args) -> int:
        cfg = _config(args)
        if cfg is not None:
            train_decoder(cfg, args.encoder, args.resume)
        return 0

    return run


def add_run(sub) -> Callable:
    p = sub.add_parser("run", help="the whole job: prepare -> pretrain -> decoder -> evaluation and figure",
                       description="Prepare the data (the bundled music21 corpus unless data.paths is set; cached, so a "
                                   "second run is fast), pretrain the encoder, train the decoder, then write the "
                                   "validation summary (summary.md / summary.json) and a reconstruction figure (recon.png).")
    _common(p, "run")
    p.add_argument("--workers", type=int, help="processes for the prepare step (default: all cores)")
    p.add_argument("--no-probe", action="store_true", help="leave out the probe suite at the end (see `midi-rae probe`)")

    def run(args) -> int:
        cfg = _config(args)
        if cfg is not None:
            run_all(cfg, args.resume, args.workers, probe=not args.no_probe)
        return 0

    return run
