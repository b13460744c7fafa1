"""Notes -> roll: `render` paints exactly the roll symusic's piano-roll renderer makes (the dense
cache's), for whole pieces, crops with shifts, velocities and frame-only settings."""
from pathlib import Path

import music21
import numpy as np
import pytest
import symusic

from midi_rae.corpus import corpus_root
from midi_rae.cache import crop
from midi_rae.roll import PITCHES, RollSettings, read_pieces, render, score_to_notes, sounding

WHEEL_MIDI = sorted(Path(music21.__file__).parent.rglob("*.mid"))
SETTINGS = [RollSettings(), RollSettings(velocity=True), RollSettings(onset=False), RollSettings(steps_per_beat=12)]


def symusic_roll(score: symusic.Score, settings: RollSettings) -> np.ndarray:
    """The dense rolls of earlier versions: notes merged in order of increasing velocity, painted
    by symusic's `pianoroll` (later notes overwrite earlier ones)."""
    tracks = [t for t in score.tracks if settings.drums or not t.is_drum]
    merged = symusic.Score(score.ticks_per_quarter)
    for t in tracks:
        merged.tracks.append(t)
    merged = merged.resample(tpq=settings.steps_per_beat, min_dur=1)
    parts = [t.notes.numpy() for t in merged.tracks]
    notes = {k: np.concatenate([n[k] for n in parts]) for k in ("time", "duration", "pitch", "velocity")}
    steps = int((notes["time"] + notes["duration"]).max())
    order = np.argsort(notes["velocity"], kind="stable")
    one = symusic.Track("merged", 0, False)
    one.notes = symusic.Note.from_numpy(*(notes[k][order] for k in ("time", "duration", "pitch", "velocity")))
    modes = ["frame", "onset"] if settings.onset else ["frame"]
    pr = one.pianoroll(modes=modes, pitch_range=(0, PITCHES), encode_velocity=settings.velocity)
    roll = np.zeros((len(modes), PITCHES, steps), dtype=np.uint8)
    t = min(steps, pr.shape[-1])
    roll[..., :t] = pr[..., :t]
    return roll


def scores() -> list[symusic.Score]:
    out = [symusic.Score(str(p)) for p in WHEEL_MIDI]
    root = corpus_root()
    out += [symusic.Score.from_abc(t) for t in
            __import__("midi_rae.roll", fromlist=["split_abc"]).split_abc((root / "essenFolksong" / "han1.abc").read_text())[:20]]
    # Overlapping notes of one pitch with different velocities, a note at step 0 and at the end.
    s = symusic.Score(4)
    t = symusic.Track("t", 0, False)
    for n in [(0, 4, 60, 100), (2, 1, 60, 30), (2, 3, 60, 50), (5, 2, 61, 7), (5, 2, 61, 9), (0, 7, 0, 1), (6, 1, 127, 127)]:
        t.notes.append(symusic.Note(*n))
    s.tracks.append(t)
    return out + [s]


@pytest.mark.parametrize("settings", SETTINGS, ids=["default", "velocity", "frame-only", "12-per-beat"])
def test_render_equals_symusic_roll(settings: RollSettings) -> None:
    rng = np.random.default_rng(0)
    for score in scores():
        notes, steps = score_to_notes(score, settings)
        roll = symusic_roll(score, settings)
        np.testing.assert_array_equal(render(notes, steps, settings), roll)
        np.testing.assert_array_equal(sounding(notes, steps), roll[0].any(axis=0))
        for _ in range(20):  # crops inside, across and outside the piece, shifted out of range too
            start, width, shift = int(rng.integers(-40, steps + 8)), int(rng.integers(1, 70)), int(rng.integers(-130, 131))
            for c in range(1, settings.channels + 1):
                np.testing.assert_array_equal(render(notes, steps, settings, start, width, shift, channels=c),
                                              crop(roll, start, width, shift)[:c])


def test_corpus_pieces_render_like_symusic() -> None:
    # One file per reader: MusicXML and kern through music21, ABC through abc2midi.
    root = corpus_root()
    for path in (root / "bach" / "bwv66.6.mxl", root / "palestrina" / "Agnus_01.krn"):
        [piece], _ = read_pieces(path)
        assert piece.notes.dtype.itemsize == 10 and (np.diff(piece.notes["start"].astype(np.int64)) >= 0).all()
        assert piece.roll.shape == (2, 128, piece.steps) and piece.roll[1].sum() == len(set(zip(piece.notes["start"], piece.notes["pitch"])))  # unisons share a pixel
