"""Hand-crafted descriptors on hand-made rolls: every value checked against what a musician reads off."""
import numpy as np
import torch

from midi_rae.descriptors import NAMES, crop_descriptors, descriptors, onsets_of


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
    assert torch.isfinite(descriptors(torch.zeros(2, 1, 128, 16))).all()
    assert crop_descriptors(np.zeros((128, 8), bool), np.zeros((128, 8), bool)).shape == (len(NAMES),)
