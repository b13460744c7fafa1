"""Reconstruction metrics: pixel precision / recall / specificity / F1 at a threshold, and
per-sample precision / recall / F1 on the pixels of masked patches.

A pixel is a note when its target is > 0 (`masking.note_mask`: velocity rolls count every
note) and predicted a note when its probability is > `threshold`. Counts are summed over a whole validation set before the ratios are taken (pixel
metrics) or the ratios are taken per sample and then averaged over the samples where they are
defined (masked-patch metrics: a sample whose masked patches hold no note and got none
predicted has no precision, recall or F1 and does not enter their means).

Classification metrics (probes, fine-tuning): accuracy, balanced accuracy, the confusion matrix,
and balanced accuracy over bootstrap resamples of the test groups (for intervals and paired differences).
"""
from __future__ import annotations

import torch
from torch import Tensor

from midi_rae.masking import note_mask, patch_pixels


def confusion(probs: Tensor, target: Tensor, threshold: float = 0.5, where: Tensor | None = None) -> Tensor:
    """Per-sample (tp, fp, fn, tn) counts: (B, 4) float64. probs, target: (B, ...); `where`
    (broadcastable bool) restricts the count to some pixels."""
    pred, true = probs > threshold, note_mask(target)
    sel = torch.ones_like(pred) if where is None else where.expand_as(pred)
    counts = [pred & true, pred & ~true, ~pred & true, ~pred & ~true]
    return torch.stack([(c & sel).flatten(1).sum(1) for c in counts], dim=1).double()


def ratios(counts: Tensor) -> dict[str, Tensor]:
    """precision, recall, specificity, f1 from (..., 4) counts; NaN where undefined (0 / 0)."""
    tp, fp, fn, tn = counts.unbind(-1)
    div = lambda a, b: a / b  # noqa: E731  0 / 0 -> NaN, as wanted
    return {"precision": div(tp, tp + fp), "recall": div(tp, tp + fn),
            "specificity": div(tn, tn + fp), "f1": div(2 * tp, 2 * tp + fp + fn)}


# The thresholds swept when one is chosen (on training crops) for the pixel metrics.
THRESHOLDS = torch.round(torch.arange(0.05, 0.951, 0.05) * 100) / 100


def inside_piece(start: Tensor, steps: Tensor, width: int) -> Tensor:
    """(B,) first column and length of each crop's piece -> (B, 1, 1, W) bool, True on the
    columns inside the piece: the zero padding past a piece's end is not scored."""
    col = start[:, None] + torch.arange(width)[None]  # (B, W): each column's step in its piece
    return ((col >= 0) & (col < steps[:, None]))[:, None, None, :]


def masked_pixels(visible: Tensor, shape: torch.Size, patch_size: tuple[int, int]) -> Tensor:
    """(B, N) patch visibility (True = visible) -> (B, 1, H, W) bool, True on pixels of masked patches."""
    ph, pw = patch_size
    return patch_pixels(~visible, (shape[2] // ph, shape[3] // pw), patch_size)


class PixelMeter:
    """Sums confusion counts over batches: `update(probs, target, where)`, then `compute()`."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self.counts = torch.zeros(4, dtype=torch.float64)

    def update(self, probs: Tensor, target: Tensor, where: Tensor | None = None) -> None:
        self.counts += confusion(probs, target, self.threshold, where).sum(0).cpu()

    def compute(self) -> dict[str, float]:
        out = {k: float(v) for k, v in ratios(self.counts).items()}
        out["threshold"] = self.threshold
        return out


class MaskedPatchMeter:
    """Per-sample P / R / F1 on the frame-channel pixels of each sample's own masked patches
    inside its piece, averaged; and `masked_f1_floor`, what a decoder that says "note" on every
    such pixel scores there. The mask is the encoder's own, drawn mostly over patches with notes,
    so the floor is far above a content-blind mask's (0.17 against 0.02 on folk-song crops): read
    masked F1 against its floor, and compare it only between runs of one masking scheme."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self.per_sample: list[Tensor] = []  # (B, 4) counts
        self.floor: list[Tensor] = []  # (B, 4) counts of the all-notes prediction

    def update(self, probs: Tensor, target: Tensor, visible: Tensor, patch_size: tuple[int, int],
               inside: Tensor | None = None) -> None:
        """probs, target: (B, C, H, W); visible: (B, N); inside: (B, 1, 1, W) bool or None (all)."""
        where = masked_pixels(visible, probs.shape, patch_size)  # (B, 1, H, W)
        if inside is not None:
            where = where & inside
        probs, target = probs[:, :1], target[:, :1]  # the frame channel, as every pixel metric
        self.per_sample.append(confusion(probs, target, self.threshold, where).cpu())
        self.floor.append(confusion(torch.ones_like(probs), target, self.threshold, where).cpu())

    def compute(self) -> dict[str, float]:
        r = ratios(torch.cat(self.per_sample))
        floor = ratios(torch.cat(self.floor))
        return {"masked_precision": float(r["precision"].nanmean()), "masked_recall": float(r["recall"].nanmean()),
                "masked_f1": float(r["f1"].nanmean()), "masked_f1_floor": float(floor["f1"].nanmean()),
                "samples": len(r["f1"])}


def threshold_sweep(probs: Tensor, target: Tensor, thresholds: Tensor, where: Tensor | None = None) -> Tensor:
    """(tp, fp, fn, tn) summed over the batch at each threshold: (len(thresholds), 4) float64."""
    return torch.stack([confusion(probs, target, float(t), where).sum(0) for t in thresholds])


def best_f1(counts: Tensor, thresholds: Tensor) -> tuple[float, int]:
    """The threshold with the highest pixel F1 of a `threshold_sweep`, and its index (first of ties)."""
    f1 = torch.nan_to_num(ratios(counts)["f1"], nan=-1.0)
    i = int(torch.argmax(f1))
    return float(thresholds[i]), i


def note_onsets(frame: Tensor, onset: Tensor | None = None) -> Tensor:
    """Where notes start, as `roll.roll_to_score` reads a roll: the frame switches on, or the
    onset channel marks a new note while the frame stays on. (B, H, W) bool -> (B, H, W) bool."""
    prev = torch.zeros_like(frame)
    prev[..., 1:] = frame[..., :-1]
    starts = frame & ~prev
    return starts | (frame & onset) if onset is not None else starts


def onset_confusion(pred: Tensor, true: Tensor, where: Tensor | None = None) -> Tensor:
    """Note-level (tp, fp, fn) per sample, (B, 3) float64: a predicted note counts when a true
    note has the same pitch and onset step. pred, true: (B, C, H, W) bool rolls (channel 0
    frame, channel 1 onsets if present); `where` (B, 1 or C, H, W) bool keeps onsets inside it."""
    def starts(r: Tensor) -> Tensor:
        onset = r[:, 1] if r.shape[1] > 1 else None
        s = note_onsets(r[:, 0], onset)  # (B, H, W)
        # A note sounding in column 0 may have started before the crop: an onset there only
        # when the onset channel marks one, never for a frame that is merely on.
        s[..., 0] = onset[..., 0] & r[:, 0, :, 0] if onset is not None else False
        return s & where[:, 0] if where is not None else s

    p, t = starts(pred), starts(true)
    return torch.stack([(p & t).flatten(1).sum(1), (p & ~t).flatten(1).sum(1), (~p & t).flatten(1).sum(1)], 1).double()


def onset_ratios(counts: Tensor) -> dict[str, float]:
    """precision, recall, f1 from summed (tp, fp, fn); NaN where undefined."""
    tp, fp, fn = (float(v) for v in counts)
    nan = float("nan")
    return {"precision": tp / (tp + fp) if tp + fp else nan, "recall": tp / (tp + fn) if tp + fn else nan,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan}


def variance_components(emb: Tensor, fraction: float = 0.9) -> tuple[Tensor, int]:
    """Singular values of the centred tokens (N, D), descending, and how many components hold
    `fraction` of the variance."""
    s = torch.linalg.svdvals(emb.double() - emb.double().mean(0))
    share = torch.cumsum(s.square(), 0) / s.square().sum().clamp_min(1e-300)
    return s.float(), int(torch.searchsorted(share, torch.tensor(fraction, dtype=share.dtype)).clamp_max(len(s) - 1)) + 1


# ----------------------------------------------------------------------------- classification (probes, fine-tuning)


def scores(pred: Tensor, true: Tensor) -> dict[str, float]:
    """accuracy and balanced accuracy (mean recall over the classes present in `true`)."""
    recalls = [float((pred[true == c] == c).float().mean()) for c in true.unique()]
    return {"accuracy": float((pred == true).float().mean()), "balanced_accuracy": sum(recalls) / len(recalls)}


def bootstrap_balanced_accuracy(correct: Tensor, true: Tensor, groups: list[str], n_boot: int = 1000,
                                seed: int = 0) -> Tensor:
    """Balanced accuracy of M predictors on `n_boot` resamples of the test set: (n_boot, M) float64.

    correct: (M, N) bool, whether predictor m got item n right; true: (N,) classes; groups: (N,) the
    unit resampled with replacement (a work: crops of one work are not independent draws). Every
    predictor is scored on the same resamples, so differences between columns are paired. A class
    that a resample leaves out does not count in its mean (as `scores`: classes present in `true`).
    """
    names = sorted(set(groups))
    member = torch.tensor([names.index(g) for g in groups])  # (N,) group index of each item
    draws = torch.randint(len(names), (n_boot, len(names)), generator=torch.Generator().manual_seed(seed))
    times = torch.zeros(n_boot, len(names), dtype=torch.float64).scatter_add_(  # (n_boot, G) times drawn
        1, draws, torch.ones(draws.shape, dtype=torch.float64))
    w = times[:, member]  # (n_boot, N) weight of each item in each resample
    onehot = torch.nn.functional.one_hot(true, int(true.max()) + 1).double()  # (N, C)
    per_class = w @ onehot  # (n_boot, C) items of each class drawn
    hits = torch.einsum("bn,mn,nc->bmc", w, correct.double(), onehot)  # (n_boot, M, C) of them right
    present = (per_class > 0).unsqueeze(1)  # (n_boot, 1, C)
    recall = torch.where(present, hits / per_class.clamp_min(1.0).unsqueeze(1), 0.0)
    return recall.sum(2) / present.sum(2)


def class_confusion(pred: Tensor, true: Tensor, n_classes: int) -> Tensor:
    """(n_classes, n_classes) long counts: row = true class, column = predicted class."""
    return torch.bincount(true * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
