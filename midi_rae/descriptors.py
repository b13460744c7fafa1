"""Hand-crafted music descriptors of piano-roll crops: the baseline a music-information-retrieval
researcher would write in ten lines, which learned embeddings have to beat to be worth using.

Per crop (frame channel 0, onset channel 1 when present; otherwise an onset is a sounding pixel
whose left neighbour is silent):
- pitch-class profile (duration-weighted) rotated to the tonic of its best Krumhansl-Kessler key,
  plus that key's major and minor correlations (transposition-normalised, so it says "how tonal,
  which mode", not "which key");
- melodic intervals of the top voice between successive onsets, -12..12 semitones (clipped);
- inter-onset intervals between onset columns, 1..16 steps (clipped);
- onset autocorrelation at lags 1..32 (meter and rhythm period);
- scalars: onset and sounding density, mean and max polyphony, pitch range / centroid / spread,
  mean note length, number of pitch classes used.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# Krumhansl & Kessler (1982) key profiles, tonic first.
KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
MAX_INTERVAL, MAX_IOI, MAX_LAG = 12, 16, 32
NAMES = ([f"pc_rel_{i}" for i in range(12)] + ["key_corr_major", "key_corr_minor"]
         + [f"interval_{i}" for i in range(-MAX_INTERVAL, MAX_INTERVAL + 1)]
         + [f"ioi_{i}" for i in range(1, MAX_IOI + 1)] + [f"onset_autocorr_{k}" for k in range(1, MAX_LAG + 1)]
         + ["onset_density", "sounding_density", "polyphony_mean", "polyphony_max", "pitch_low", "pitch_high",
            "pitch_range", "pitch_centroid", "pitch_spread", "note_length", "pitch_classes_used"])


def _profile_corr(pc: np.ndarray, profile: np.ndarray) -> np.ndarray:
    """(12,) pitch-class weights -> (12,) Pearson correlation with `profile` rotated to each tonic."""
    rotated = np.stack([np.roll(profile, t) for t in range(12)])  # (12 tonics, 12 pcs)
    a = pc - pc.mean()
    b = rotated - rotated.mean(1, keepdims=True)
    return (b @ a) / (np.linalg.norm(b, axis=1) * np.linalg.norm(a) + 1e-9)


def _histogram(values: np.ndarray, low: int, high: int) -> np.ndarray:
    """Normalised counts of the integers `values` clipped to low..high."""
    h = np.bincount(np.clip(values, low, high) - low, minlength=high - low + 1).astype(np.float64)
    return h / max(h.sum(), 1.0)


def crop_descriptors(frame: np.ndarray, onset: np.ndarray) -> np.ndarray:
    """(128, W) bool frame and onset maps of one crop -> (len(NAMES),) float64."""
    w = frame.shape[1]
    pitches = np.arange(128)
    weights = frame.sum(1)  # (128,) sounding steps per pitch
    pc = np.bincount(pitches % 12, weights=weights, minlength=12).astype(np.float64)
    major, minor = _profile_corr(pc, KK_MAJOR), _profile_corr(pc, KK_MINOR)
    tonic = int(np.argmax(np.maximum(major, minor)))
    pc_rel = np.roll(pc, -tonic) / max(pc.sum(), 1.0)

    o = onset.any(0)  # (W,) onset-column indicator
    cols = np.flatnonzero(o)  # onset columns, in time order
    top = np.array([pitches[onset[:, c]].max() for c in cols], dtype=np.int64)  # top voice at each onset
    intervals = _histogram(np.diff(top), -MAX_INTERVAL, MAX_INTERVAL)  # all zeros for fewer than 2 onsets
    iois = _histogram(np.diff(cols), 1, MAX_IOI)

    o = o.astype(np.float64)
    energy = max(o @ o, 1.0)
    autocorr = np.array([o[:-k] @ o[k:] / energy if k < w else 0.0 for k in range(1, MAX_LAG + 1)])

    poly = frame.sum(0)  # (W,) notes sounding per column
    sounding = poly > 0
    rows = np.flatnonzero(weights)
    centroid = float(pitches @ weights / max(weights.sum(), 1))
    spread = float(np.sqrt(((pitches - centroid) ** 2) @ weights / max(weights.sum(), 1)))
    low, high = (rows.min(), rows.max()) if len(rows) else (0, 0)
    scalars = np.array([
        onset.sum() / w, sounding.mean(), poly[sounding].mean() if sounding.any() else 0.0, poly.max(),
        low / 127, high / 127, (high - low) / 127, centroid / 127, spread / 127,
        frame.sum() / max(onset.sum(), 1) / w, (pc > 0).sum() / 12,
    ])
    return np.concatenate([pc_rel, [major.max(), minor.max()], intervals, iois, autocorr, scalars])


def onsets_of(x: Tensor) -> Tensor:
    """(N, C, 128, W) crops -> (N, 128, W) bool onsets: channel 1 when present, else note starts
    of the frame channel (a sounding pixel whose left neighbour is silent)."""
    if x.shape[1] > 1:
        return x[:, 1] > 0
    frame = x[:, 0] > 0
    prev = torch.nn.functional.pad(frame[..., :-1], (1, 0))
    return frame & ~prev


def descriptors(x: Tensor) -> Tensor:
    """(N, C, 128, W) crops in [0, 1] -> (N, len(NAMES)) float32 descriptor features."""
    frame, onset = (x[:, 0] > 0).numpy(), onsets_of(x).numpy()
    return torch.from_numpy(np.stack([crop_descriptors(f, o) for f, o in zip(frame, onset)])).float()
