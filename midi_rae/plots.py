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
    rows = np.flatnonzero((target > 0.5).any(axis=(0, 2)) | (probs > threshold).any(axis=(0, 2)))
    lo, hi = (max(int(rows[0]) - 6, 0), min(int(rows[-1]) + 7, target.shape[1])) if rows.size else (0, target.shape[1])
    fig, axes = plt.subplots(k, 3, figsize=(12, 2.6 * k), squeeze=False, constrained_layout=True)
    for i in range(k):
        true, p = target[i] > 0.5, probs[i]
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
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
