"""Reconstruction metrics, figures and summaries of a trained encoder + decoder: `evaluate`, which
`midi-rae eval` runs (below), and `run_summary`, which `midi-rae run` writes into the run folder
at its end (`recon.png`, `summary.json`, `summary.md`: the stages' last validation lines, and the
probe suite's headline when asked).

On the fixed validation crops of the run's cache (or another split / cache):

- pixel precision / recall / specificity / F1 of the frame channel at the stated threshold (the
  run's `decoder.threshold` unless given) and at the threshold in 0.05..0.95 that maximises F1
  on training crops (chosen there, never on the set it is reported on, so only on the validation split);
- note-level onset precision / recall / F1 at both thresholds: a predicted note counts when a
  true note has the same pitch and onset step (notes are read as `roll_to_midi` writes them; a
  note already sounding at a crop's first column is an onset only where the onset channel says so);
- every count uses a per-sample mask: only the columns of a crop that lie inside its piece.

Outputs in OUT (default `<run>/eval/`): `metrics.json`, `metrics.md`, `recon.png` (ground
truth / reconstruction / error map), `levels_pca.png`, `spectra.png`, `global.png`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from midi_rae import probes
from midi_rae.cache import piece_collections
from midi_rae.config import Config
from midi_rae.dataset import PianoRollDataset
from midi_rae.engine import best_threshold
from midi_rae.logger import last_record
from midi_rae.masking import note_mask
from midi_rae.metrics import (inside_piece, onset_confusion, onset_ratios, ratios, threshold_sweep,
                              variance_components)
from midi_rae.runs import (check_time_grid, datasets, load_autoencoder, resolve_cache_dir, resolve_checkpoint, spread,
                           stage_dirs, with_encoder_config)
from midi_rae.utils import atomic_write_text

MAX_TOKENS = 20_000  # tokens per level kept for PCA and spectra (a random subset beyond this)
ERROR_MAP_CAPTION = ("Error map: black = note kept (TP), red = invented (FP), blue = missed (FN); "
                     "low pitches at the bottom.")


def pick_examples(fullness: Tensor, piece_ids: list[str], starts: list[int], n: int) -> tuple[list[int], list[str]]:
    """The crops a reconstruction figure shows: the fullest crop (`fullness` (N,): its sum of
    frame pixels) of each of `n` pieces, fullest first; of equally full crops, the earlier one.
    Returns their indices and their labels `piece @ start`."""
    picked: list[int] = []
    seen: set[str] = set()
    for i in torch.argsort(fullness, descending=True, stable=True).tolist():
        if piece_ids[i] not in seen:
            seen.add(piece_ids[i])
            picked.append(i)
        if len(picked) == n:
            break
    return picked, [f"{piece_ids[i]} @ {starts[i]}" for i in picked]


def pca(fit: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Mean (D,) and top-k principal directions (D, k) of tokens (N, D); k is capped at D."""
    mean = fit.mean(0)
    _, _, v = torch.linalg.svd(fit - mean, full_matrices=False)
    return mean, v[:k].T


def pca_rgb(fit: Tensor, show: Tensor, grid: tuple[int, int]) -> np.ndarray:
    """Tokens `show` (h*w, D) projected on the first 3 PCs of `fit`, scaled by the 2nd-98th
    percentiles of `fit`'s projections to [0, 1]: an (h, w, 3) RGB map."""
    mean, v = pca(fit, 3)
    ref = (fit - mean) @ v
    lo, hi = torch.quantile(ref, 0.02, dim=0), torch.quantile(ref, 0.98, dim=0)
    z = ((show - mean) @ v - lo) / (hi - lo).clamp_min(1e-8)
    rgb = torch.zeros(show.shape[0], 3)
    rgb[:, : z.shape[1]] = z.clamp(0, 1)  # fewer than 3 channels: the rest stays black
    return rgb.reshape(*grid, 3).numpy()


def project_2d(x: Tensor) -> tuple[np.ndarray, str]:
    """UMAP when umap-learn is installed (and there are enough points), else PCA: (N, 2)."""
    try:
        import umap

        if len(x) >= 20:
            xy = umap.UMAP(n_components=2, random_state=0).fit_transform(x.numpy())
            return np.asarray(xy), "UMAP"
    except ImportError:
        pass
    mean, v = pca(x, 2)
    xy = torch.zeros(len(x), 2)
    xy[:, : v.shape[1]] = (x - mean) @ v
    return xy.numpy(), "PCA"


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


@torch.no_grad()
def evaluate(checkpoint: str | os.PathLike, out_dir: str | os.PathLike | None = None,
             cache_dir: str | os.PathLike | None = None, threshold: float | None = None, split: str = "val",
             max_items: int | None = None, n_examples: int = 4, batch_size: int = 16,
             device: str = "cpu") -> dict[str, Any]:
    """Metrics (returned, and written as JSON + Markdown) and figures of a trained run."""
    from midi_rae.plots import level_pca_figure, projection_figure, recon_figure, spectrum_figure

    if threshold is not None and not 0 <= threshold < 1:
        raise ValueError(f"the threshold is a note probability, in [0, 1); got {threshold}")
    if (max_items is not None and max_items < 1) or n_examples < 0:
        raise ValueError(f"need max_items >= 1 (or none: the run's data.val_max_items) and examples >= 0; "
                         f"got {max_items}, {n_examples}")
    ck = resolve_checkpoint(checkpoint)
    model, cfg = load_autoencoder(ck, device)
    cache = Path(cache_dir) if cache_dir else resolve_cache_dir(cfg)
    check_time_grid(cfg, cache, ck.encoder.path, overrides=False)  # before any folder is made
    out = Path(out_dir) if out_dir else (ck.run_dir or ck.encoder.path.parent) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    thr = cfg.decoder.threshold if threshold is None else threshold
    d = cfg.data
    ds = PianoRollDataset(cache, split, crop_width=d.crop_width, pair=False, val_fraction=d.val_fraction,
                          channels=d.channels, seed=cfg.decoder_train.seed)
    limit = max_items or d.val_max_items or len(ds)
    data = Subset(ds, spread(limit, len(ds)))  # every collection, not the first pieces by id
    # The best-F1 threshold is chosen on training crops, so it is reported on validation crops only:
    # on --split train (or all) it would be scored on the crops it was chosen on.
    thresholds = {"stated": thr}
    if split == "val":
        train_ds = PianoRollDataset(cache, "train", crop_width=d.crop_width, pair=False, val_fraction=d.val_fraction,
                                    channels=d.channels, seed=cfg.decoder_train.seed)
        train_data = Subset(train_ds, spread(limit, len(train_ds)))
        thresholds["best_f1"] = best_threshold(model, DataLoader(train_data, batch_size=batch_size, shuffle=False), device)
    collection = piece_collections(cache)
    xs, probs_all, masks, coll, piece_ids, starts = [], [], [], [], [], []
    tokens: list[list[Tensor]] = [[] for _ in model.encoder.feature_info]
    pooled = []
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
        x = batch["x"].to(device)  # (B, C, 128, W)
        enc = model.encoder(x)
        p = model.decoder(enc).sigmoid().float()
        mask = inside_piece(batch["start"], batch["steps"], x.shape[-1]).expand(-1, 1, x.shape[2], -1).to(device)  # (B, 1, 128, W)
        xs.append(x.cpu())
        probs_all.append(p.cpu())
        masks.append(mask.cpu())
        coll += [collection[pid] for pid in batch["piece_id"]]
        piece_ids += batch["piece_id"]
        starts += batch["start"].tolist()
        for li, lvl in enumerate(enc.patches):
            tokens[li].append(lvl.emb.flatten(0, 1).float().cpu())
        pooled.append(enc.patches.coarsest.emb.mean(1).float().cpu())  # (B, D0): the global token (mean of the grid)
    x, probs, mask = torch.cat(xs), torch.cat(probs_all), torch.cat(masks)
    results: dict[str, Any] = {"checkpoint": str(checkpoint), "cache": str(cache), "split": split, "samples": len(x),
                               "encoder": cfg.model.encoder, "channel": "frame", "mask": "columns inside the piece"}
    if "best_f1" in thresholds:
        results["best_f1_chosen_on"] = f"{min(len(train_ds), limit)} training crops"
    for name, t in thresholds.items():
        px = ratios(threshold_sweep(probs[:, :1], x[:, :1], torch.tensor([t]), mask)[0])
        notes = onset_confusion(probs > t, note_mask(x), mask).sum(0)
        results[name] = {"threshold": t, "pixel": _finite({k: float(v) for k, v in px.items()}),
                         "onset": _finite(onset_ratios(notes)), "notes": {"tp": int(notes[0]), "fp": int(notes[1]),
                                                                          "fn": int(notes[2])}}

    # Figures.
    picked, labels = pick_examples(x[:, 0].flatten(1).sum(1), piece_ids, starts, n_examples)
    figures = {"recon": recon_figure(x[picked, 0].numpy(), probs[picked, 0].numpy(), out / "recon.png", thr,
                                     f"{cfg.name}: {split} crops, frame channel (p > {thr:g})", labels)}
    gen = torch.Generator().manual_seed(0)
    fit = []
    for toks in tokens:
        t = torch.cat(toks)
        fit.append(t[torch.randperm(len(t), generator=gen)[:MAX_TOKENS]])
    infos = model.encoder.feature_info
    names = [f"level {i} ({info.name})" for i, info in enumerate(infos)]
    ex = picked[0]
    ex_enc = model.encoder(x[ex:ex + 1].to(device))
    maps = [pca_rgb(f, lvl.emb[0].float().cpu(), info.grid_size) for f, lvl, info in zip(fit, ex_enc.patches, infos)]
    figures["levels_pca"] = level_pca_figure(x[ex, 0].numpy(), maps, [info.downsample for info in infos], names,
                                             out / "levels_pca.png", f"{cfg.name}: {labels[0]}, PCA of each level as RGB")
    spectra = [variance_components(f) for f in fit]
    results["spectra"] = {n: {"components_90": k, "dim": len(s)} for n, (s, k) in zip(names, spectra)}
    figures["spectra"] = spectrum_figure([s.numpy() for s, _ in spectra], [k for _, k in spectra], names,
                                         out / "spectra.png", f"{cfg.name}: token spectra per level ({split} crops)")
    xy, method = project_2d(torch.cat(pooled))
    figures["global"] = projection_figure(xy, coll, out / "global.png",
                                          f"{cfg.name}: global token (mean of level 0) of {len(xy)} crops, {method}", method)
    results["figures"] = {k: str(v) for k, v in figures.items()}
    atomic_write_text(out / "metrics.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "metrics.md", markdown(results) + "\n")
    return results


def markdown(r: dict[str, Any]) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"# Evaluation of {r['checkpoint']}", "",
             f"{r['samples']} {r['split']} crops of {r['cache']}; {r['encoder']} encoder; pixel metrics on the frame "
             f"channel; per-sample masks keep the columns inside each piece. A note counts when a true note has the "
             f"same pitch and onset step.", "",
             "| threshold | pixel precision | pixel recall | pixel specificity | pixel F1 | onset precision | onset recall | onset F1 |",
             "|---|---|---|---|---|---|---|---|"]
    for name in ("stated", "best_f1")[: 2 if "best_f1" in r else 1]:
        s, label = r[name], "stated" if name == "stated" else f"best F1 on {r['best_f1_chosen_on']}"
        px, on = s["pixel"], s["onset"]
        lines.append(f"| {s['threshold']:g} ({label}) | {fmt(px['precision'])} | {fmt(px['recall'])} | "
                     f"{fmt(px['specificity'])} | {fmt(px['f1'])} | {fmt(on['precision'])} | {fmt(on['recall'])} | {fmt(on['f1'])} |")
    lines += ["", "| level | components for 90% variance | dim |", "|---|---|---|"]
    lines += [f"| {n} | {v['components_90']} | {v['dim']} |" for n, v in r["spectra"].items()]
    lines += [""] + [f"![{k}]({Path(v).name})" for k, v in r["figures"].items()]
    lines += ["", ERROR_MAP_CAPTION]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the summary of a run


def run_summary(cfg: Config, n_examples: int = 4, probe: bool = False) -> dict[str, Any]:
    """Reconstruction figure and summary of a finished run: `recon.png`, `summary.json`, `summary.md`;
    with `probe`, the probe suite's headline as well (`probe_summary`), in both summaries."""
    from midi_rae.plots import recon_figure

    run_dir, pre_dir, dec_dir = stage_dirs(cfg)
    model, enc_cfg = load_autoencoder(dec_dir / "decoder.safetensors")
    _, val = datasets(with_encoder_config(cfg, enc_cfg), enc_cfg.decoder_train.seed, False)
    items = [val[i] for i in range(len(val))]
    fullness = torch.tensor([float(it["x"][0].sum()) for it in items])  # (N,)
    picked, labels = pick_examples(fullness, [it["piece_id"] for it in items], [it["start"] for it in items], n_examples)
    x = torch.stack([items[i]["x"] for i in picked])  # (K, C, 128, W)
    with torch.no_grad():
        probs = model.logits(x).sigmoid()
    thr = enc_cfg.decoder.threshold
    fig = recon_figure(x[:, 0].numpy(), probs[:, 0].numpy(), run_dir / "recon.png", thr,
                       f"{cfg.name}: validation crops, frame channel", labels)
    pre_final, dec_final = last_record(pre_dir / "metrics.jsonl", "final"), last_record(dec_dir / "metrics.jsonl", "final")
    pre_val, dec_val = last_record(pre_dir / "metrics.jsonl", "val"), last_record(dec_dir / "metrics.jsonl", "val")
    summary = {
        "name": cfg.name, "encoder": enc_cfg.model.encoder, "figure": str(fig),
        "pretrain": {"steps": pre_final.get("step"), "seconds": pre_final.get("seconds"),
                     **{k: pre_val.get(k) for k in ("loss", "masked_precision", "masked_recall", "masked_f1", "masked_f1_floor", "samples") if k in pre_val}},
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
    # `loss` is the objective's weighted sum on validation crops; the masked_* scores exist only where
    # the objective masks patches (an unmasked autoencoder such as `reference` has none).
    md += [f"| pretrain ({'validation objective' if k == 'loss' else 'masked patches, per-sample mean, p > 0.5'}) "
           f"| {k} | {fmt(v)} |" for k, v in p.items() if k not in ("steps", "seconds")]
    md += [f"| decoder (pixels of the frame channel inside the piece, p > {q.get('threshold', thr)}) | {k} | {fmt(v)} |" for k, v in q.items() if k not in ("steps", "seconds", "threshold")]
    md += ["", f"![reconstruction]({fig.name})", "", ERROR_MAP_CAPTION]
    atomic_write_text(run_dir / "summary.md", "\n".join(md) + "\n")
    # The probe suite takes minutes: the summary above is on disk before it starts.
    if probe and (heads := probe_summary(cfg)) is not None:
        summary["probe"] = heads
        md += ["", "## Linear probes (balanced accuracy on held-out pieces; all levels pooled; details in probe.md)", "",
               *probes.headline_table(heads["models"], heads["headline"]), "",
               "The random-initialisation twin has the trained encoder's shape: what pretraining added is the "
               "difference; the descriptors are hand-crafted music statistics (midi_rae.descriptors). The "
               "differences, with 95 % intervals over resamples of the test works (paired):", "",
               *probes.differences_table(heads["differences"])]
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
    probes.write(result, run_dir / "probe.json")
    return {"models": result["models"], "headline": probes.headline(result),
            "differences": [d for t in result["tasks"] for d in t["differences"]]}
