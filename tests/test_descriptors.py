"""Hand-crafted descriptors on hand-made rolls: every value checked against what a musician reads off."""
import numpy as np
import torch

from midi_rae.descriptors import KK_MAJOR, KK_MINOR, MAX_INTERVAL, MAX_IOI, MAX_LAG, NAMES, descriptors, onsets_of


def roll(notes: list[tuple[int, int, int]], width: int = 32) -> torch.Tensor:
    """(1, 2, 128, width) frame + onset channels from (pitch, onset step, length) notes."""
    x = torch.zeros(1, 2, 128, width)
    for pitch, start, length in notes:
        x[0, 0, pitch, start:start + length] = 1
        x[0, 1, pitch, start] = 1
    return x


def named(x: torch.Tensor) -> dict[str, float]:
    return dict(zip(NAMES, descriptors(x)[0].tolist()))


def test_scale_in_g_major() -> None:
    # G major scale up from G4, one note every 2 steps, each 2 steps long.
    scale = [67, 69, 71, 72, 74, 76, 78, 79]
    d = named(roll([(p, 2 * i, 2) for i, p in enumerate(scale)]))
    assert len(descriptors(roll([(60, 0, 1)]))[0]) == len(NAMES)
    # Transposition-normalised: the tonic G is bin 0, and the scale's degrees hold the weight.
    rel = np.array([d[f"pc_rel_{i}"] for i in range(12)])
    assert np.isclose(rel.sum(), 1) and np.isclose(rel[0], 2 / 8) and all(rel[[1, 3, 6, 8, 10]] == 0)
    assert d["key_corr_major"] > d["key_corr_minor"]
    assert np.isclose(d["interval_2"], 5 / 7) and np.isclose(d["interval_1"], 2 / 7)  # whole and half steps up
    assert d["ioi_2"] == 1.0
    assert np.isclose(d["onset_autocorr_2"], 7 / 8) and d["onset_autocorr_1"] == 0
    assert np.isclose(d["onset_density"], 8 / 32) and np.isclose(d["sounding_density"], 16 / 32)
    assert d["polyphony_mean"] == 1 and d["polyphony_max"] == 1
    assert np.isclose(d["pitch_low"], 67 / 127) and np.isclose(d["pitch_range"], 12 / 127)
    assert np.isclose(d["note_length"], 2 / 32) and np.isclose(d["pitch_classes_used"], 7 / 12)


def test_chords_polyphony_and_top_voice() -> None:
    # Three-note chords every 8 steps; the top voice climbs a third each time.
    chords = [(48 + 4 * k + o, 8 * k, 4) for k in range(4) for o in (0, 4, 7)]
    d = named(roll(chords))
    assert d["polyphony_max"] == 3 and d["polyphony_mean"] == 3
    assert d["interval_4"] == 1.0 and d["ioi_8"] == 1.0


def test_onsets_from_the_frame_channel_alone() -> None:
    x = roll([(60, 0, 4), (60, 4, 4), (64, 10, 2)])
    # Without an onset channel, a repeated note merges with its predecessor: two onsets, not three.
    assert int(onsets_of(x[:, :1]).sum()) == 2 and int(onsets_of(x).sum()) == 3


def test_empty_crop_is_finite() -> None:
    d = descriptors(torch.zeros(2, 1, 128, 16))
    assert d.shape == (2, len(NAMES)) and torch.isfinite(d).all()
    assert descriptors(torch.zeros(0, 1, 128, 16)).shape == (0, len(NAMES))


# The reference: the same descriptors one crop at a time in numpy, as a reader would write them.
# The package computes them batched in torch (one training step needs them for every crop).


def _ref_profile_corr(pc: np.ndarray, profile: np.ndarray) -> np.ndarray:
    rotated = np.stack([np.roll(profile, t) for t in range(12)])  # (12 tonics, 12 pcs)
    a = pc - pc.mean()
    b = rotated - rotated.mean(1, keepdims=True)
    return (b @ a) / (np.linalg.norm(b, axis=1) * np.linalg.norm(a) + 1e-9)


def _ref_histogram(values: np.ndarray, low: int, high: int) -> np.ndarray:
    h = np.bincount(np.clip(values, low, high) - low, minlength=high - low + 1).astype(np.float64)
    return h / max(h.sum(), 1.0)


def reference_crop_descriptors(frame: np.ndarray, onset: np.ndarray) -> np.ndarray:
    """(128, W) bool frame and onset maps of one crop -> (len(NAMES),) float64."""
    w = frame.shape[1]
    pitches = np.arange(128)
    weights = frame.sum(1)
    pc = np.bincount(pitches % 12, weights=weights, minlength=12).astype(np.float64)
    major, minor = _ref_profile_corr(pc, KK_MAJOR), _ref_profile_corr(pc, KK_MINOR)
    tonic = int(np.argmax(np.maximum(major, minor)))
    pc_rel = np.roll(pc, -tonic) / max(pc.sum(), 1.0)
    o = onset.any(0)
    cols = np.flatnonzero(o)
    top = np.array([pitches[onset[:, c]].max() for c in cols], dtype=np.int64)
    intervals = _ref_histogram(np.diff(top), -MAX_INTERVAL, MAX_INTERVAL)
    iois = _ref_histogram(np.diff(cols), 1, MAX_IOI)
    o = o.astype(np.float64)
    energy = max(o @ o, 1.0)
    autocorr = np.array([o[:-k] @ o[k:] / energy if k < w else 0.0 for k in range(1, MAX_LAG + 1)])
    poly = frame.sum(0)
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


def random_rolls(n: int, width: int, channels: int, seed: int) -> torch.Tensor:
    """(n, channels, 128, width) rolls of random notes, from empty to dense, some in a narrow range."""
    rng = np.random.default_rng(seed)
    x = torch.zeros(n, channels, 128, width)
    for i in range(n):
        lo = int(rng.integers(0, 100))
        for _ in range(int(rng.integers(0, 3 * width))):
            pitch, start = int(rng.integers(lo, min(lo + 30, 128))), int(rng.integers(0, width))
            x[i, 0, pitch, start:start + int(rng.integers(1, 9))] = 1
            if channels > 1:
                x[i, 1, pitch, start] = 1
    return x


def test_batched_equals_the_one_crop_reference() -> None:
    for width, channels, seed in ((128, 1, 0), (128, 2, 1), (24, 2, 2), (7, 1, 3)):  # under MAX_LAG too
        x = random_rolls(40, width, channels, seed)
        frame, onset = (x[:, 0] > 0).numpy(), onsets_of(x).numpy()
        want = np.stack([reference_crop_descriptors(f, o) for f, o in zip(frame, onset)])
        got = descriptors(x)
        assert got.dtype == torch.float32 and got.shape == want.shape
        np.testing.assert_allclose(got.numpy(), want.astype(np.float32), rtol=1e-6, atol=1e-6)


def test_batches_do_not_change_the_result(monkeypatch) -> None:
    import midi_rae.descriptors as module

    x = random_rolls(10, 64, 2, 4)
    whole = descriptors(x)
    monkeypatch.setattr(module, "CHUNK", 3)
    assert torch.equal(descriptors(x), whole)
