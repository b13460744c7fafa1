"""Figures of piano rolls: ground truth / reconstruction / error map.

Rolls are drawn with the origin at the bottom (low pitches at the bottom, time to the right).
Error map colours: true positive (note kept) black, false positive (note invented) red, false
negative (note missed) blue, true negative white.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from midi_rae.utils import atomic_write  # noqa: E402

COLOURS = {"TP": (0.0, 0.0, 0.0), "FP": (0.85, 0.1, 0.1), "FN": (0.1, 0.35, 0.95), "TN": (1.0, 1.0, 1.0)}


def error_map(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(H, W) bool prediction and target -> (H, W, 3) RGB with the COLOURS above."""
    rgb = np.empty((*true.shape, 3))
    for name, sel in (("TN", ~pred & ~true), ("TP", pred & true), ("FP", pred & ~true), ("FN", ~pred & true)):
        rgb[sel] = COLOURS[name]
    return rgb


def recon_figure(target: np.ndarray, probs: np.ndarray, path: str | Path, threshold: float = 0.5,
                 title: str = "", labels: list[str] | None = None) -> Path:
    """One row per sample: ground truth, reconstruction (probability), error map at `threshold`.
    target, probs: (K, H, W) arrays in [0, 1] (one channel, e.g. frames)."""
    k = target.shape[0]
    # Show the pitch range in use (with a margin), so that thin melodies stay legible.
    rows = np.flatnonzero((target > 0).any(axis=(0, 2)) | (probs > threshold).any(axis=(0, 2)))
    lo, hi = (max(int(rows[0]) - 6, 0), min(int(rows[-1]) + 7, target.shape[1])) if rows.size else (0, target.shape[1])
    fig, axes = plt.subplots(k, 3, figsize=(12, 2.6 * k), squeeze=False, constrained_layout=True)
    for i in range(k):
        true, p = target[i] > 0, probs[i]  # any velocity is a note
        panels = [(target[i], "ground truth", "gray_r"), (p, "reconstruction (p)", "gray_r"),
                  (error_map(p > threshold, true), f"error map (p > {threshold:g})", None)]
        for ax, (img, name, cmap) in zip(axes[i], panels):
            ax.imshow(img[lo:hi], origin="lower", aspect="auto", interpolation="nearest", cmap=cmap,
                      extent=(-0.5, img.shape[1] - 0.5, lo - 0.5, hi - 0.5), **({"vmin": 0, "vmax": 1} if cmap else {}))
            ax.set_title(f"{labels[i]}: {name}" if labels and ax is axes[i][0] else name, fontsize=8)
            ax.set_xlabel("time step", fontsize=7)
            ax.set_ylabel("pitch", fontsize=7)
            ax.tick_params(labelsize=6)
    handles = [Patch(facecolor=COLOURS[n], edgecolor="k", label=n) for n in ("TP", "FP", "FN")]
    fig.legend(handles=handles, loc="upper right", fontsize=7, ncol=3)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    """Write the figure (format from the file's suffix) through a temporary file, then close it."""
    path = Path(path)
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)


def level_pca_figure(roll: np.ndarray, maps: list[np.ndarray], downsamples: list[tuple[int, int]], names: list[str],
                     path: str | Path, title: str = "") -> Path:
    """The input roll (H, W) and, per level, an RGB map (h, w, 3) of its tokens' first three
    principal components, each drawn over the pixels the tokens cover (pitch at the bottom)."""
    H, W = roll.shape
    n = len(maps) + 1
    fig, axes = plt.subplots(1, n, figsize=(max(3.2 * n, 8), 4.6), squeeze=False, constrained_layout=True)
    axes = axes[0]
    axes[0].imshow(roll, origin="lower", aspect="auto", cmap="gray_r", vmin=0, vmax=1, interpolation="nearest",
                   extent=(-0.5, W - 0.5, -0.5, H - 0.5))
    axes[0].set_title("input (frame)", fontsize=9)
    for ax, rgb, (dh, dw), name in zip(axes[1:], maps, downsamples, names):
        h, w, _ = rgb.shape
        ax.imshow(rgb, origin="lower", aspect="auto", interpolation="nearest", extent=(-0.5, w * dw - 0.5, -0.5, h * dh - 0.5))
        ax.set_title(f"{name}: {h}x{w} tokens of {dh}x{dw}", fontsize=9)
    for ax in axes:
        ax.set_xlabel("time step", fontsize=8)
        ax.set_ylabel("pitch", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title or "PCA of each level's tokens as RGB (PC1 red, PC2 green, PC3 blue)", fontsize=10)
    return _save(fig, path)


def spectrum_figure(spectra: list[np.ndarray], k90: list[int], names: list[str], path: str | Path, title: str = "") -> Path:
    """Per level: singular values (log scale, left) and cumulative explained variance (right),
    with the number of components needed for 90% of the variance."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for s, k, name in zip(spectra, k90, names):
        s = np.asarray(s, dtype=float)
        idx = np.arange(1, len(s) + 1)
        line, = a.semilogy(idx, np.maximum(s, 1e-12), marker=".", label=f"{name} (90%: {k} of {len(s)})")
        share = np.cumsum(s**2) / max(float((s**2).sum()), 1e-300)
        b.plot(idx, share, marker=".", color=line.get_color(), label=name)
        b.axvline(k, color=line.get_color(), ls=":", lw=1)
    a.set(xlabel="component", ylabel="singular value", title="singular-value spectrum")
    b.axhline(0.9, color="k", ls="--", lw=0.8)
    b.set(xlabel="components", ylabel="cumulative variance", title="explained variance (dotted: 90%)", ylim=(0, 1.02))
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def projection_figure(xy: np.ndarray, labels: list[str], path: str | Path, title: str = "", method: str = "PCA") -> Path:
    """2-D points (N, 2) coloured by label, with a legend."""
    fig, ax = plt.subplots(figsize=(7.5, 6), constrained_layout=True)
    names = sorted(set(labels))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    lab = np.asarray(labels)
    for i, name in enumerate(names):
        sel = lab == name
        ax.scatter(xy[sel, 0], xy[sel, 1], s=14, alpha=0.75, color=cmap(i % cmap.N), label=f"{name} ({int(sel.sum())})")
    ax.set(xlabel=f"{method} 1", ylabel=f"{method} 2", title=title or f"global token, {method}")
    ax.legend(fontsize=8, title="collection", title_fontsize=8, loc="best")
    return _save(fig, path)


def rate_distortion_figure(curves: dict[str, list[tuple[int, float | None, float | None]]], path: str | Path,
                           title: str = "") -> Path:
    """Pixel F1 (left) and note-onset F1 (right) against floats per crop (log x), one line per
    encoder; `curves[name]` holds (floats, pixel F1, onset F1) points, undefined F1 as None."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True, sharex=True)
    for name, pts in curves.items():
        pts = sorted(pts)
        for ax, j in zip(axes, (1, 2)):
            xy = [(p[0], p[j]) for p in pts if p[j] is not None]
            if xy:
                ax.plot(*zip(*xy), marker="o", label=name)
    for ax, what in zip(axes, ("pixel F1", "note-onset F1")):
        ax.set_xscale("log")
        ax.set(xlabel="floats per crop (levels read, coarsest first)", ylabel=what, title=what, ylim=(0, 1.02))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, title="encoder", title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def confusion_figure(counts: np.ndarray, classes: list[str], path: str | Path, title: str = "") -> Path:
    """A confusion matrix (K, K) of counts, rows = true class, columns = predicted: each cell
    shaded by its share of the row (the class's recall on the diagonal) and labelled with its count."""
    counts = np.asarray(counts)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    k = len(classes)
    fig, ax = plt.subplots(figsize=(2.4 + 0.55 * k, 1.8 + 0.5 * k), constrained_layout=True)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(k), classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)
