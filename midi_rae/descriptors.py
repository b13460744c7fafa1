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
# The rhythm features (inter-onset intervals and onset autocorrelation): the metre's carriers, which
# alone read the time signature about as well as all the descriptors do (benchmarks/RESULTS.md).
RHYTHM = [i for i, name in enumerate(NAMES) if name.startswith(("ioi_", "onset_autocorr_"))]


CHUNK = 256  # crops per batch of work: its (CHUNK, 128, W) bool and uint8 maps stay a few MB


def _profile_corr(pc: Tensor, profile: np.ndarray) -> Tensor:
    """(N, 12) pitch-class weights -> (N, 12) Pearson correlation with `profile` rotated to each tonic."""
    rotated = torch.from_numpy(np.stack([np.roll(profile, t) for t in range(12)]))  # (12 tonics, 12 pcs)
    a = pc - pc.mean(1, keepdim=True)
    b = rotated - rotated.mean(1, keepdim=True)
    return (a @ b.T) / (b.norm(dim=1) * a.norm(dim=1, keepdim=True) + 1e-9)


def _histogram(values: Tensor, counted: Tensor, low: int, high: int) -> Tensor:
    """(N, K) integers, of which the (N, K) bool `counted` ones are clipped to low..high and counted
    -> (N, high - low + 1) normalised counts (all zeros where none is counted)."""
    h = torch.zeros(values.shape[0], high - low + 1, dtype=torch.float64)
    h.scatter_add_(1, values.clamp(low, high) - low, counted.double())
    return h / h.sum(1, keepdim=True).clamp(min=1.0)


def _descriptors(frame: Tensor, onset: Tensor) -> Tensor:
    """(N, 128, W) bool frame and onset maps -> (N, len(NAMES)) float64."""
    n, n_pitches, w = frame.shape
    pitches = torch.arange(n_pitches)
    weights = frame.sum(2).double()  # (N, 128) sounding steps per pitch
    pc = weights @ torch.nn.functional.one_hot(pitches % 12, 12).double()  # (N, 12)
    major, minor = _profile_corr(pc, KK_MAJOR), _profile_corr(pc, KK_MINOR)
    tonic = torch.maximum(major, minor).argmax(1, keepdim=True)  # (N, 1), the first best as np.argmax
    pc_rel = pc.gather(1, (tonic + torch.arange(12)) % 12) / pc.sum(1, keepdim=True).clamp(min=1.0)

    cols = torch.arange(w)
    onsets_per_col = onset.sum(1)  # (N, W); one-axis sums of the bool maps are the fast reductions here
    o = onsets_per_col > 0  # (N, W) onset-column indicator
    # (N, W) top voice at each column (-1: none), in uint8 arithmetic: the (N, 128, W) map is the cost here.
    top = (onset * torch.arange(1, n_pitches + 1, dtype=torch.uint8)[:, None]).amax(1).long() - 1
    # The onset column before each column: the running max of onset-column indices, shifted by one.
    prev = torch.nn.functional.pad(torch.where(o, cols, -1).cummax(1).values[:, :-1], (1, 0), value=-1)
    follows = o & (prev >= 0)  # (N, W) an onset column with an earlier one: one interval and one IOI
    intervals = _histogram(top - top.gather(1, prev.clamp(min=0)), follows, -MAX_INTERVAL, MAX_INTERVAL)
    iois = _histogram(cols - prev, follows, 1, MAX_IOI)

    od = o.double()
    energy = (od * od).sum(1).clamp(min=1.0)
    zero = torch.zeros(n, dtype=torch.float64)
    autocorr = torch.stack([(od[:, :-k] * od[:, k:]).sum(1) / energy if k < w else zero
                            for k in range(1, MAX_LAG + 1)], 1)

    poly = frame.sum(1).double()  # (N, W) notes sounding per column
    sounding = poly > 0
    used = weights > 0
    total = weights.sum(1).clamp(min=1.0)
    centroid = weights @ pitches.double() / total
    spread = ((pitches.double() - centroid[:, None]) ** 2 * weights).sum(1).div(total).sqrt()
    any_used = used.any(1)
    low = torch.where(any_used, torch.where(used, pitches, n_pitches).amin(1), 0).double()
    high = torch.where(any_used, torch.where(used, pitches, -1).amax(1), 0).double()
    n_onsets = onsets_per_col.sum(1).double()
    scalars = torch.stack([
        n_onsets / w, sounding.double().mean(1), poly.sum(1) / sounding.sum(1).clamp(min=1), poly.amax(1),
        low / 127, high / 127, (high - low) / 127, centroid / 127, spread / 127,
        weights.sum(1) / n_onsets.clamp(min=1.0) / w, (pc > 0).sum(1).double() / 12,
    ], 1)
    return torch.cat([pc_rel, major.amax(1, keepdim=True), minor.amax(1, keepdim=True), intervals, iois,
                      autocorr, scalars], 1)


def onsets_of(x: Tensor) -> Tensor:
    """(N, C, 128, W) crops -> (N, 128, W) bool onsets: channel 1 when present, else note starts
    of the frame channel (a sounding pixel whose left neighbour is silent)."""
    if x.shape[1] > 1:
        return x[:, 1] > 0
    frame = x[:, 0] > 0
    prev = torch.nn.functional.pad(frame[..., :-1], (1, 0))
    return frame & ~prev


def descriptors(x: Tensor) -> Tensor:
    """(N, C, 128, W) crops in [0, 1] -> (N, len(NAMES)) float32 descriptor features, computed on
    the CPU in batches of CHUNK crops (float64 inside, as the statistics of short crops need)."""
    x = x.detach().cpu()
    parts = [_descriptors(x[i:i + CHUNK, 0] > 0, onsets_of(x[i:i + CHUNK])) for i in range(0, len(x), CHUNK)]
    return torch.cat(parts).float() if parts else torch.zeros(0, len(NAMES))
