"""Reconstruction metrics: pixel precision / recall / specificity / F1 at a threshold, and
per-sample precision / recall / F1 on the pixels of masked patches.

A pixel is a note when its target is > 0.5 and predicted a note when its probability is >
`threshold`. Counts are summed over a whole validation set before the ratios are taken (pixel
metrics) or the ratios are taken per sample and then averaged over the samples where they are
defined (masked-patch metrics: a sample whose masked patches hold no note and got none
predicted has no precision, recall or F1 and does not enter their means).
"""
from __future__ import annotations

import torch
from torch import Tensor


def confusion(probs: Tensor, target: Tensor, threshold: float = 0.5, where: Tensor | None = None) -> Tensor:
    """Per-sample (tp, fp, fn, tn) counts: (B, 4) float64. probs, target: (B, ...); `where`
    (broadcastable bool) restricts the count to some pixels."""
    pred, true = probs > threshold, target > 0.5
    sel = torch.ones_like(pred) if where is None else where.expand_as(pred)
    counts = [pred & true, pred & ~true, ~pred & true, ~pred & ~true]
    return torch.stack([(c & sel).flatten(1).sum(1) for c in counts], dim=1).double()


def ratios(counts: Tensor) -> dict[str, Tensor]:
    """precision, recall, specificity, f1 from (..., 4) counts; NaN where undefined (0 / 0)."""
    tp, fp, fn, tn = counts.unbind(-1)
    div = lambda a, b: a / b  # noqa: E731  0 / 0 -> NaN, as wanted
    return {"precision": div(tp, tp + fp), "recall": div(tp, tp + fn),
            "specificity": div(tn, tn + fp), "f1": div(2 * tp, 2 * tp + fp + fn)}


def masked_pixels(visible: Tensor, shape: torch.Size, patch_size: tuple[int, int]) -> Tensor:
    """(B, N) patch visibility (True = visible) -> (B, 1, H, W) bool, True on pixels of masked patches."""
    B, _, H, W = shape
    ph, pw = patch_size
    grid = (~visible).view(B, 1, H // ph, W // pw)
    return grid.repeat_interleave(ph, 2).repeat_interleave(pw, 3)


class PixelMeter:
    """Sums confusion counts over batches: `update(probs, target)`, then `compute()`."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self.counts = torch.zeros(4, dtype=torch.float64)

    def update(self, probs: Tensor, target: Tensor) -> None:
        self.counts += confusion(probs, target, self.threshold).sum(0).cpu()

    def compute(self) -> dict[str, float]:
        out = {k: float(v) for k, v in ratios(self.counts).items()}
        out["threshold"] = self.threshold
        return out


class MaskedPatchMeter:
    """Per-sample P / R / F1 on the pixels of each sample's own masked patches, averaged."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self.per_sample: list[Tensor] = []  # (B, 4) counts

    def update(self, probs: Tensor, target: Tensor, visible: Tensor, patch_size: tuple[int, int]) -> None:
        where = masked_pixels(visible, probs.shape, patch_size)
        self.per_sample.append(confusion(probs, target, self.threshold, where).cpu())

    def compute(self) -> dict[str, float]:
        counts = torch.cat(self.per_sample)
        r = ratios(counts)
        return {"masked_precision": float(r["precision"].nanmean()), "masked_recall": float(r["recall"].nanmean()),
                "masked_f1": float(r["f1"].nanmean()), "samples": int(counts.shape[0])}
