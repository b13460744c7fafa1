"""`midi-rae train`, `train-decoder` and `run`: the training stages (`midi_rae.stages`) from the
command line, and `run`'s whole job with its report.

Run folder `<out_dir>/<name>/`:

- `pretrain/`: `config.yaml`, `metrics.jsonl`, `checkpoints/`, `encoder.safetensors`, `tb/`
- `decoder/`:  `config.yaml`, `metrics.jsonl`, `checkpoints/`, `decoder.safetensors`, `tb/`
- `recon.png`, `summary.json`, `summary.md` (written by `run` / `report`)
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from midi_rae import probes
from midi_rae.cache import prepare
from midi_rae.config import Config
from midi_rae.data import RollSettings
from midi_rae.distributed import setup
from midi_rae.logger import last_record
from midi_rae.runs import datasets, load_autoencoder, resolve_cache_dir, stage_dirs, with_encoder_config
from midi_rae.stages import pretrain, train_decoder
from midi_rae.utils import atomic_write_text


# ----------------------------------------------------------------------------- report


def report(cfg: Config, n_examples: int = 4) -> dict[str, Any]:
    """Reconstruction figure and summary of a finished run: `recon.png`, `summary.json`, `summary.md`."""
    from midi_rae.plots import recon_figure

    run_dir, pre_dir, dec_dir = stage_dirs(cfg)
    model, enc_cfg = load_autoencoder(dec_dir / "decoder.safetensors")
    _, val = datasets(with_encoder_config(cfg, enc_cfg), enc_cfg.decoder_train.seed, False)
    # One crop from each of several validation pieces: the fullest among a piece's first crops.
    by_piece: dict[str, Any] = {}
    for i in range(len(val)):
        it = val[i]
        if float(it["x"][0].sum()) > float(by_piece.get(it["piece_id"], {"x": torch.zeros(1)})["x"][0].sum()):
            by_piece[it["piece_id"]] = it
    items = sorted(by_piece.values(), key=lambda it: -float(it["x"][0].sum()))[:n_examples]
    x = torch.stack([it["x"] for it in items])
    with torch.no_grad():
        probs = model.logits(x).sigmoid()
    thr = enc_cfg.decoder.threshold
    labels = [f"{it['piece_id']} @ {it['start']}" for it in items]
    fig = recon_figure(x[:, 0].numpy(), probs[:, 0].numpy(), run_dir / "recon.png", thr,
                       f"{cfg.name}: validation crops, frame channel", labels)
    pre_final, dec_final = last_record(pre_dir / "metrics.jsonl", "final"), last_record(dec_dir / "metrics.jsonl", "final")
    pre_val, dec_val = last_record(pre_dir / "metrics.jsonl", "val"), last_record(dec_dir / "metrics.jsonl", "val")
    summary = {
        "name": cfg.name, "encoder": enc_cfg.model.encoder, "figure": str(fig),
        "pretrain": {"steps": pre_final.get("step"), "seconds": pre_final.get("seconds"),
                     **{k: pre_val.get(k) for k in ("loss", "masked_precision", "masked_recall", "masked_f1", "samples") if k in pre_val}},
        "decoder": {"steps": dec_final.get("step"), "seconds": dec_final.get("seconds"),
                    **{k: dec_val.get(k) for k in ("loss", "precision", "recall", "specificity", "f1", "threshold") if k in dec_val}},
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    p, q = summary["pretrain"], summary["decoder"]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    md = [f"# {cfg.name}: validation summary", "",
          f"Encoder: {enc_cfg.model.encoder}, pretrained {p['steps']} steps ({p['seconds']} s); decoder "
          f"{q['steps']} steps ({q['seconds']} s).", "",
          "| stage | metric | value |", "|---|---|---|"]
    md += [f"| pretrain (masked patches, per-sample mean, p > 0.5) | {k} | {fmt(v)} |" for k, v in p.items() if k not in ("steps", "seconds")]
    md += [f"| decoder (pixels of the frame channel inside the piece, p > {q.get('threshold', thr)}) | {k} | {fmt(v)} |" for k, v in q.items() if k not in ("steps", "seconds", "threshold")]
    md += ["", f"![reconstruction]({fig.name})", "",
           "Error map: black = note kept (TP), red = invented (FP), blue = missed (FN); low pitches at the bottom."]
    atomic_write_text(run_dir / "summary.md", "\n".join(md) + "\n")
    return summary


def probe_summary(cfg: Config) -> dict[str, Any] | None:
    """The probe suite's headline for a finished run (all levels, 2 crops per piece), written to
    `probe.json` / `probe.md` / `probe.png` in the run folder; None when the run's data carries no
    label with two classes to probe."""
    run_dir = stage_dirs(cfg)[0]
    try:
        result = probes.probe([run_dir], resolve_cache_dir(cfg), level="all", crops_per_piece=2)
    except ValueError as e:  # no task in this corpus's metadata
        print(f"[probe] skipped: {e}", flush=True)
        return None
    atomic_write_text(run_dir / "probe.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(run_dir / "probe.md", probes.table(result) + "\n")
    probes.figure(result, run_dir / "probe.png")
    return {"models": result["models"], "headline": probes.headline(result)}


def _probe_markdown(p: dict[str, Any]) -> list[str]:
    md = ["", "## Linear probes (balanced accuracy on held-out pieces; all levels pooled; details in probe.md)", "",
          *probes.headline_table(p["models"], p["headline"])]
    return md + ["", "The random-initialisation twin has the trained encoder's shape: what pretraining added is the "
                 "difference; the descriptors are hand-crafted music statistics (midi_rae.descriptors)."]


def run_all(cfg: Config, resume: bool = False, workers: int | None = None, probe: bool = True) -> dict[str, Any]:
    """prepare -> pretrain -> decoder -> report -> probe suite: the package's main job."""
    t0 = time.time()
    rank = int(os.environ.get("RANK", "0"))
    cache = resolve_cache_dir(cfg)
    if rank == 0:  # other processes wait at the first barrier of pretraining
        summary = prepare(cfg.data.paths or None, cache, RollSettings(),
                          workers=workers, progress=sys.stderr.isatty(), collections=cfg.data.collections)
        print(f"[prepare] {summary.line()} -> {cache} ({time.time() - t0:.0f} s)", flush=True)
        if summary.pieces == 0:
            raise ValueError(f"none of the {summary.files} input files gave a usable piece (reasons in "
                             f"{cache / 'report.txt'}); set data.paths to MIDI, ABC or MusicXML files with notes")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        setup(cfg.train)
        dist.barrier()
    pretrain(cfg, resume)
    train_decoder(cfg, resume=resume)
    out = {}
    if rank == 0:
        out = report(cfg)
        run_dir = stage_dirs(cfg)[0]
        if probe and (p := probe_summary(cfg)) is not None:
            out["probe"] = p
            md = (run_dir / "summary.md").read_text().rstrip("\n").split("\n") + _probe_markdown(p)
            atomic_write_text(run_dir / "summary.md", "\n".join(md) + "\n")
        out["wall_seconds"] = round(time.time() - t0, 1)
        atomic_write_text(run_dir / "summary.json", json.dumps(out, indent=1) + "\n")
        print(f"[run] done in {out['wall_seconds']:.0f} s: {run_dir}/summary.md, {out['figure']}", flush=True)
        print(json.dumps({"pretrain": out["pretrain"], "decoder": out["decoder"]}), flush=True)
    return out


# ----------------------------------------------------------------------------- command line


def _common(p, what: str) -> None:
    from midi_rae.config import describe

    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. model.embed_dim=16 train.lr=3e-4 name=my_run (see below)")
    p.add_argument("-c", "--config", default="quickstart",
                   help="YAML preset: a name in configs/ (quickstart, swin_midi, swin_midi_p2, vit_baseline) "
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
