"""`midi-rae levels`: a rate-distortion report of an encoder's hierarchy.

For the run's pretrained encoder and for its random twin (the same config's encoder at
initialisation, seeded with `train.seed`: the weights pretraining started from), one decoder
per coarsest-first subset of levels (k = 1: the coarsest only, k = 2: the two coarsest, ...,
k = L: all) is trained on the frozen encoder with `decoder.skip_levels = [0..k-1]` and the same
step budget, by the ordinary decoder training (`stages.train_decoder`); `--decoder-width` makes
those decoders wider than the encoder (`decoder.embed_dim`), to check that the decoder's own
capacity is not what limits a row. Each (encoder, k) row
gives:

- the rate: floats per crop, the sum over the levels read of tokens x dim (from the encoder's
  `feature_info`), and that as a fraction of the crop's pixels (128 x W x channels);
- the distortion: pixel F1 (frame channel, columns inside the piece) and note-onset F1 on the
  validation crops, at the threshold in 0.05..0.95 with the best pixel F1 on training crops
  (never on the validation crops).

Layout of OUT (default `<run>/levels/`): `<encoder>/<k>/decoder/` (a decoder stage folder:
config, metrics, checkpoints, `decoder.safetensors`), `<encoder>/<k>/result.json` (that row),
`<encoder>/<k>/settings.json` (what the row was started with), `random/encoder.safetensors`, and
the report: `levels.json`, `levels.md`, `levels.png`. A rerun skips finished rows and resumes
interrupted decoders; rows made or started with other settings (steps, batch size, encoder
weights, decoder width, or another cache: `cache.cache_identity`), and a random twin of another
config or seed, are an error unless `--overwrite`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from midi_rae.cache import cache_identity, piece_collections
from midi_rae.checkpoint import save_weights
from midi_rae.config import Config, from_dict
from midi_rae.dataset import PianoRollDataset
from midi_rae.distributed import setup
from midi_rae.engine import best_threshold
from midi_rae.masking import note_mask
from midi_rae.metrics import inside_piece, onset_confusion, onset_ratios, ratios, threshold_sweep, variance_components
from midi_rae.models import DecoderTrainer, build_encoder
from midi_rae.roll import PITCHES
from midi_rae.runs import (Checkpoint, Weights, check_time_grid, datasets, encoder_config, initial_encoder, load_autoencoder,
                           resolve_cache_dir, spread, trained_encoder)
from midi_rae.stages import train_decoder
from midi_rae.utils import atomic_write_text

ENCODERS = ("trained", "random")
SETTINGS = ("steps", "batch_size", "encoder_sha1", "decoder_width", "cache")  # a finished row is reused only when these match
# How a row's validation crops were chosen; a row scored otherwise (before: the first crops by piece
# id, three collections of the bundled corpus) is scored again, its decoder kept.
VAL_SELECTION = "spread over the validation split, by collection"


# ----------------------------------------------------------------------------- rate


def floats_per_crop(encoder: nn.Module, k: int) -> int:
    """Floats the k coarsest levels hold for one crop: sum of rows x cols x dim."""
    return sum(info.grid_size[0] * info.grid_size[1] * info.dim for info in encoder.feature_info[:k])


def crop_pixels(cfg: Config) -> int:
    return PITCHES * cfg.data.crop_width * cfg.data.channels


# ----------------------------------------------------------------------------- encoders


def resolve_encoder(run: str | os.PathLike) -> tuple[Path, Path]:
    """(encoder.safetensors, run folder) of RUN: a run folder, its `pretrain/` folder or the file."""
    p = Path(run)
    if not p.exists():
        raise FileNotFoundError(f"run {p} not found: give a run folder (runs/<name>) or an encoder.safetensors")
    enc = p
    if p.is_dir():
        enc = next((c for c in (p / "pretrain" / "encoder.safetensors", p / "encoder.safetensors") if c.exists()), None)
        if enc is None:
            raise FileNotFoundError(f"no pretrain/encoder.safetensors under {p}: train the encoder first (`midi-rae run`)")
    return enc, enc.parent.parent if enc.parent.name == "pretrain" else enc.parent


def same_weights(path: Path, state: dict[str, Tensor]) -> bool:
    """Whether the weights file at `path` holds exactly `state`."""
    saved = load_file(str(path))
    return saved.keys() == state.keys() and all(torch.equal(saved[k], v) for k, v in state.items())


def weights_sha1(path: Path) -> str:
    import hashlib

    return hashlib.sha1(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- distortion


@dataclass
class Predictions:
    """Probabilities, targets and inside-the-piece masks of the frame channel and, if any, onsets."""

    probs: Tensor  # (N, C, 128, W)
    x: Tensor  # (N, C, 128, W)
    inside: Tensor  # (N, 1, 128, W) bool: columns that lie inside the crop's piece
    collection: list[str]  # (N,) each crop's collection ("unknown" where the cache names none)


@torch.no_grad()
def predict(model: DecoderTrainer, data: Subset, device: torch.device, batch_size: int,
            collection_of: dict[str, str]) -> Predictions:
    """The decoder's probabilities on `data`; collection_of: piece id -> collection (`piece_collections`)."""
    model.eval()
    probs, xs, inside, collection = [], [], [], []
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
        x = batch["x"]  # (B, C, 128, W)
        probs.append(model.logits(x.to(device)).sigmoid().float().cpu())
        inside.append(inside_piece(batch["start"], batch["steps"], x.shape[-1]).expand(-1, 1, x.shape[2], -1))
        xs.append(x)
        collection += [collection_of[pid] for pid in batch["piece_id"]]
    return Predictions(torch.cat(probs), torch.cat(xs), torch.cat(inside), collection)


def scores(pred: Predictions, threshold: float) -> dict[str, dict[str, float | None]]:
    """Pixel and note-onset precision / recall / F1 at `threshold` (None where undefined)."""
    px = ratios(threshold_sweep(pred.probs[:, :1], pred.x[:, :1], torch.tensor([threshold]), pred.inside)[0])
    on = onset_ratios(onset_confusion(pred.probs > threshold, note_mask(pred.x), pred.inside).sum(0))
    clean = lambda d: {k: (None if v != v else round(float(v), 6)) for k, v in d.items() if k != "specificity"}  # noqa: E731
    return {"pixel": clean(px), "onset": clean(on)}


def scores_by_collection(pred: Predictions, threshold: float) -> dict[str, dict[str, Any]]:
    """`scores` of each collection's crops alone, with their number: the targets hold per
    collection, and a corpus-wide F1 is mostly that of its largest collection."""
    out = {}
    for name in sorted(set(pred.collection)):
        rows = torch.tensor([c == name for c in pred.collection])
        part = Predictions(pred.probs[rows], pred.x[rows], pred.inside[rows], [name] * int(rows.sum()))
        out[name] = {"crops": int(rows.sum()), **scores(part, threshold)}
    return out


# ----------------------------------------------------------------------------- one row


def subset_config(cfg: Config, k: int, out_dir: Path, steps: int, batch_size: int | None,
                  cache_dir: str | None, device: str | None, threads: int | None = None,
                  decoder_width: int | None = None) -> Config:
    """The run's config for the decoder of the k coarsest levels, in `out_dir/<k>/decoder/`."""
    d = cfg.to_dict()
    d.update(name=str(k), out_dir=str(out_dir))
    d["decoder"].update(skip_levels=list(range(k)), finetune_encoder=False)
    if decoder_width:
        d["decoder"]["embed_dim"] = decoder_width
    d["decoder_train"].update(max_steps=steps, eval_every=0, progress=False, tensorboard=False, wandb=False,
                              ckpt_every=min(d["decoder_train"]["ckpt_every"], steps))
    if batch_size:
        d["decoder_train"]["batch_size"] = batch_size
    if device:
        d["decoder_train"]["device"] = device
    if threads:
        d["decoder_train"]["threads"] = threads
    if cache_dir:
        d["data"]["cache_dir"] = str(cache_dir)
    return from_dict(Config, d)


@dataclass
class RowData:
    """What every row is scored on, built once per report: training crops for the threshold, the
    validation crops, and each piece's collection."""

    train: Subset
    val: Subset
    collection_of: dict[str, str]


def evaluate_row(cfg: Config, enc_path: Path, dec_path: Path, d: RowData) -> dict[str, Any]:
    device = setup(cfg.decoder_train).device
    model, _ = load_autoencoder(Checkpoint(cfg, Weights(enc_path), Weights(dec_path), None), device)
    bs = cfg.decoder_train.batch_size
    thr = best_threshold(model, DataLoader(d.train, batch_size=bs, shuffle=False), device)
    pred = predict(model, d.val, device, bs, d.collection_of)
    return {"threshold": thr, "threshold_from": f"train ({len(d.train)} crops)", "val_crops": len(d.val),
            "val_selection": VAL_SELECTION, "val": scores(pred, thr), "val_by_collection": scores_by_collection(pred, thr)}


@torch.inference_mode()
def level_spectra(cfg: Config, enc_path: Path, val: Subset) -> list[dict[str, int]]:
    """Per level (coarsest first): how many principal components hold 90 % of the variance of
    its non-empty tokens over the validation crops, beside its dim. A level that pretraining
    collapsed onto a few directions shows it here, before any decoder is trained; the random
    twin's figure is what the same shape holds without training."""
    device = setup(cfg.decoder_train).device
    encoder = trained_encoder(Checkpoint(cfg, Weights(enc_path), None, None), cfg).to(device).eval()
    tokens: list[list[Tensor]] = [[] for _ in encoder.feature_info]
    for batch in DataLoader(val, batch_size=cfg.decoder_train.batch_size, shuffle=False):
        for li, lvl in enumerate(encoder(batch["x"].to(device)).patches):
            tokens[li].append(lvl.emb[lvl.non_empty].float().cpu())  # (tokens with notes, D)
    out = []
    for li, t in enumerate(map(torch.cat, tokens)):
        out.append({"level": li, "dim": t.shape[1], "tokens": len(t),
                    "components_90": variance_components(t)[1] if len(t) > 1 else 0})
    return out


def run_row(cfg: Config, encoder: str, k: int, enc_path: Path, out: Path, settings: dict[str, Any],
            overwrite: bool, data: Callable[[], RowData]) -> dict[str, Any]:
    """Train (or resume) and evaluate the decoder of row (encoder, k); reuse a finished one."""
    row_dir = out / encoder / str(k)
    done = row_dir / "result.json"
    if done.exists():
        row = json.loads(done.read_text())
        changed = [f"{s}: {row.get(s)!r} there, {settings[s]!r} now" for s in SETTINGS if row.get(s) != settings[s]]
        dec_path = row_dir / "decoder" / "decoder.safetensors"
        if not changed and row.get("val_selection") != VAL_SELECTION and dec_path.exists():
            print(f"[levels] {encoder} k={k}: done before ({done}); scoring it again on the validation crops "
                  f"{VAL_SELECTION}", flush=True)
            row.update(evaluate_row(cfg, enc_path, dec_path, data()))
            atomic_write_text(done, json.dumps(row, indent=1) + "\n")
            return row
        if not changed:
            print(f"[levels] {encoder} k={k}: done before ({done})", flush=True)
            return row
        if not overwrite:
            raise ValueError(f"{row_dir} was made with other settings ({'; '.join(changed)}): pass the same "
                             f"settings, another output folder (-o), or --overwrite to train it again")
    if overwrite and row_dir.exists():
        shutil.rmtree(row_dir)
    started = row_dir / "settings.json"  # what the row's decoder was started with, checked before resuming it
    if started.exists() and json.loads(started.read_text()) != settings:
        raise ValueError(f"{row_dir} holds a decoder interrupted with other settings (the encoder weights, steps, "
                         f"batch size, width or cache changed since): pass the same settings, another output "
                         f"folder (-o), or --overwrite to train it again")
    row_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(started, json.dumps(settings, indent=1) + "\n")
    print(f"[levels] {encoder} encoder, levels 0..{k - 1}: training a decoder for {settings['steps']} steps", flush=True)
    final = train_decoder(cfg, enc_path, resume=True)  # resume: continues an interrupted row
    row = {"encoder": encoder, "k": k, "levels": list(range(k)), **settings, "train_seconds": final["seconds"],
           **evaluate_row(cfg, enc_path, row_dir / "decoder" / "decoder.safetensors", data())}
    atomic_write_text(done, json.dumps(row, indent=1) + "\n")
    return row


# ----------------------------------------------------------------------------- the report


def finished(enc_dir: Path, settings: dict[str, Any]) -> list[int]:
    """Subsets of `enc_dir` with a result made with these settings (weights, steps, batch size)."""
    ks = []
    for f in sorted(enc_dir.glob("*/result.json")):
        row = json.loads(f.read_text())
        if all(row.get(s) == settings[s] for s in SETTINGS):
            ks.append(int(row["k"]))
    return sorted(ks)


def levels_report(run: str | os.PathLike, out_dir: str | os.PathLike | None = None, steps: int = 1000,
                  batch_size: int | None = None, subsets: list[int] | None = None, random: bool = True,
                  overwrite: bool = False, cache_dir: str | None = None, device: str | None = None,
                  threads: int | None = None, decoder_width: int | None = None) -> dict[str, Any]:
    """Train the decoders of every (encoder, coarsest-first subset) and write the report;
    returns it as a dict (`rows`: one per (encoder, k)). `decoder_width`: the decoders' finest
    width (`decoder.embed_dim`), default the run's decoder config."""
    t0 = time.time()
    enc_path, run_dir = resolve_encoder(run)
    cfg = encoder_config(enc_path)
    if cfg.model.encoder != "swin":
        raise ValueError(f"{enc_path} is a {cfg.model.encoder} encoder; the levels report needs a Swin encoder "
                         f"(decoder.skip_levels reads Swin levels)")
    for flag, value in (("steps", steps), ("batch-size", batch_size), ("threads", threads),
                        ("decoder-width", decoder_width)):
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be at least 1, got {value}")
    trained = build_encoder(cfg)
    L = len(trained.feature_info)
    ks = sorted(set(subsets or range(1, L + 1)))
    bad = [k for k in ks if not 1 <= k <= L]
    if bad:
        raise ValueError(f"subsets {bad} are impossible: the encoder has {L} levels, so k (the number of coarsest "
                         f"levels read) must be in 1..{L}")
    # the cache the rows train and score on (`--cache-dir`, else the run's): a row of another is not reused
    cache_path = Path(cache_dir).expanduser() if cache_dir else resolve_cache_dir(cfg)
    # and the run's own cache still holds its split; checked before any folder is made
    check_time_grid(cfg, cache_path, enc_path, overrides=False)
    out = Path(out_dir) if out_dir else run_dir / "levels"
    out.mkdir(parents=True, exist_ok=True)
    encoders = {"trained": enc_path}
    if random:
        rand_path = out / "random" / "encoder.safetensors"
        twin = initial_encoder(cfg).state_dict()
        if rand_path.exists() and not same_weights(rand_path, twin):
            if not overwrite:  # another run's twin (an -o shared by runs): its rows would pass for this run's
                raise ValueError(f"{rand_path} is not this run's random twin (another config or train.seed made it): "
                                 f"give another output folder (-o), or --overwrite to make this run's and train its rows again")
            rand_path.unlink()
        if not rand_path.exists():
            rand_path.parent.mkdir(parents=True, exist_ok=True)
            save_weights(twin, rand_path,
                         {"config": cfg.to_yaml(), "kind": "encoder", "step": "0", "init_seed": str(cfg.train.seed)})
        encoders["random"] = rand_path

    cached: dict[str, RowData] = {}

    def data(row_cfg: Config) -> Callable[[], RowData]:
        def get() -> RowData:  # built once, when the first row is evaluated
            if "d" not in cached:
                _, val = datasets(row_cfg, row_cfg.decoder_train.seed, False)
                dc = row_cfg.data
                train = PianoRollDataset(val.dataset.cache_dir, "train", crop_width=dc.crop_width, pair=False,
                                         val_fraction=dc.val_fraction, channels=dc.channels, seed=row_cfg.decoder_train.seed)
                cached["d"] = RowData(Subset(train, spread(len(val), len(train))), val,
                                      piece_collections(val.dataset.cache_dir))
            return cached["d"]
        return get

    width = decoder_width or cfg.decoder.embed_dim  # None: the encoder's (rows made before the option say None too)
    cache = cache_identity(cache_path)
    rows, spectra = [], {}
    for name, path in encoders.items():
        settings = {"steps": steps, "batch_size": batch_size or cfg.decoder_train.batch_size,
                    "encoder_sha1": weights_sha1(path), "decoder_width": width, "cache": cache}
        for k in ks + [k for k in finished(out / name, settings) if k not in ks]:  # earlier rows stay in the report
            row_cfg = subset_config(cfg, k, out / name, steps, batch_size, cache_dir, device, threads, decoder_width)
            row = run_row(row_cfg, name, k, path, out, settings, overwrite, data(row_cfg))
            floats = floats_per_crop(trained, k)
            rows.append({**row, "floats_per_crop": floats, "fraction_of_pixels": floats / crop_pixels(cfg)})
        spectra[name] = level_spectra(row_cfg, path, data(row_cfg)().val)
    rows.sort(key=lambda r: (ENCODERS.index(r["encoder"]), r["k"]))
    report = {"run": str(run_dir), "out": str(out), "encoder_weights": str(enc_path), "crop_pixels": crop_pixels(cfg),
              "crop": [PITCHES, cfg.data.crop_width, cfg.data.channels], "steps": steps,
              "decoder_width": width or cfg.model.embed_dim,
              "levels": [{"grid": list(i.grid_size), "dim": i.dim, "name": i.name} for i in trained.feature_info],
              "random_init_seed": cfg.train.seed if random else None,
              "threshold_from": "train", "metric_split": "val", "rows": rows, "spectra": spectra, "seconds": round(time.time() - t0, 1)}
    write_report(report, out)
    return report


def _levels_read(k: int) -> str:
    return "0" if k == 1 else f"0..{k - 1}"


def markdown(r: dict[str, Any]) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"# Rate-distortion report of {r['run']}", "",
             f"One decoder per (encoder, k coarsest levels), {r['steps']} steps each on the frozen encoder (decoder "
             f"width {r['decoder_width']}). Floats "
             f"per crop: tokens x dim summed over the levels read; a crop has {r['crop_pixels']:,} pixels "
             f"({' x '.join(map(str, r['crop']))}). F1 on validation crops (frame channel inside the piece; onsets: "
             f"same pitch and step) at the threshold with the best pixel F1 on training crops.", "",
             "| encoder | levels read | floats / crop | floats / pixels | threshold (train) | pixel F1 | onset F1 |",
             "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['encoder']} | {_levels_read(row['k'])} | {row['floats_per_crop']:,} | "
                     f"{row['fraction_of_pixels']:.3f} | {row['threshold']:g} | {fmt(row['val']['pixel']['f1'])} | {fmt(row['val']['onset']['f1'])} |")
    if r.get("spectra"):  # reports made before the spectra existed have none
        lines += ["", "Components holding 90 % of the variance of each level's non-empty tokens (validation crops), of its dim:",
                  "", "| level | dim | " + " | ".join(f"{e} encoder" for e in r["spectra"]) + " |", "|---|---|" + "---|" * len(r["spectra"])]
        for li, level in enumerate(next(iter(r["spectra"].values()))):
            lines.append(f"| {li} | {level['dim']} | " + " | ".join(str(s[li]["components_90"]) for s in r["spectra"].values()) + " |")
    lines += ["", "![F1 against floats per crop](levels.png)"]
    names = sorted({c for row in r["rows"] for c in row.get("val_by_collection", {})})
    if len(names) > 1:  # rows made before the breakdown existed show "-"
        counts = {c: row["val_by_collection"][c]["crops"] for row in r["rows"] for c in row.get("val_by_collection", {})}
        lines += ["", "Pixel F1 by collection (the same validation crops and threshold; crops per collection in the header):",
                  "", "| encoder | levels read | " + " | ".join(f"{c} ({counts[c]})" for c in names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for row in r["rows"]:
            by = row.get("val_by_collection", {})
            lines.append(f"| {row['encoder']} | {_levels_read(row['k'])} | "
                         + " | ".join(fmt(by[c]["pixel"]["f1"]) if c in by else "-" for c in names) + " |")
    return "\n".join(lines)


def write_report(r: dict[str, Any], out: Path) -> None:
    from midi_rae.plots import rate_distortion_figure

    curves: dict[str, list[tuple[int, float | None, float | None]]] = {}
    for row in r["rows"]:
        curves.setdefault(row["encoder"], []).append(
            (row["floats_per_crop"], row["val"]["pixel"]["f1"], row["val"]["onset"]["f1"]))
    rate_distortion_figure(curves, out / "levels.png", f"F1 on validation crops against floats per crop "
                                                       f"({r['crop_pixels']:,} pixels), {r['steps']} decoder steps")
    atomic_write_text(out / "levels.json", json.dumps(r, indent=1) + "\n")
    atomic_write_text(out / "levels.md", markdown(r) + "\n")


# ----------------------------------------------------------------------------- command line


def add_levels(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser("levels", help="rate-distortion report: decoders on the k coarsest levels, trained vs random encoder",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run folder (runs/<name>) or encoder.safetensors")
    p.add_argument("--steps", type=int, default=1000, help="decoder training steps per row (default 1000)")
    p.add_argument("--batch-size", type=int, help="decoder batch size (default: the run's decoder_train.batch_size)")
    p.add_argument("--subsets", type=int, nargs="+", metavar="K",
                   help="numbers of coarsest levels to read (default: 1..L, every subset)")
    p.add_argument("--no-random", action="store_true", help="skip the random-encoder rows")
    p.add_argument("-o", "--out", help="output folder (default: <run>/levels)")
    p.add_argument("--overwrite", action="store_true", help="train again rows made with other settings")
    p.add_argument("--cache-dir", help="roll cache (default: the run's own data)")
    p.add_argument("--device", help="cpu or cuda (default: the run's decoder_train.device)")
    p.add_argument("--threads", type=int, help="CPU threads (default: the run's decoder_train.threads)")
    p.add_argument("--decoder-width", type=int, metavar="D",
                   help="swin decoders' finest-stage width (decoder.embed_dim; default: the run's, else the encoder's)")

    def run(args: argparse.Namespace) -> int:
        r = levels_report(args.run, args.out, args.steps, args.batch_size, args.subsets, not args.no_random,
                          args.overwrite, args.cache_dir, args.device, args.threads, args.decoder_width)
        print(markdown(r))
        print(f"\nwritten: {r['out']}/levels.json, levels.md, levels.png ({r['seconds']:.0f} s)")
        return 0

    return run
