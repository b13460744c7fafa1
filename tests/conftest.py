"""Shared fixtures: tiny prepared roll caches for the training, probe and fine-tuning tests."""
from pathlib import Path

import numpy as np
import pytest
import symusic

from midi_rae.cache import prepare


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 synthetic pieces of random chords (a fifth of them land in the validation split)."""
    root = tmp_path_factory.mktemp("tiny_data")
    rng = np.random.default_rng(0)
    for i in range(24):
        score = symusic.Score(480)
        track = symusic.Track("t", 0, False)
        for beat in range(int(rng.integers(16, 48))):
            for pitch in rng.integers(48, 80, 3):
                track.notes.append(symusic.Note(beat * 480, 480 * int(rng.integers(1, 3)), int(pitch), 90))
        score.tracks.append(track)
        score.dump_midi(str(root / f"p{i:02d}.mid"))
    cache = root / "cache"
    prepare([root], cache, workers=1, progress=False)
    return cache


@pytest.fixture(scope="session")
def labelled_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 'collections' (folder names): dense low chords of short notes vs a sparse high melody of long notes."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(1)
    for collection in ("chords", "melody"):
        (root / collection).mkdir()
        for i in range(24):
            score, track = symusic.Score(480), symusic.Track("t", 0, False)
            for beat in range(int(rng.integers(12, 32))):
                if collection == "chords":
                    for pitch in rng.integers(40, 60, 4):
                        track.notes.append(symusic.Note(beat * 480, 240, int(pitch), 90))
                elif beat % 2 == 0:
                    track.notes.append(symusic.Note(beat * 480, 960, int(rng.integers(72, 84)), 90))
            score.tracks.append(track)
            score.dump_midi(str(root / collection / f"{collection}{i:02d}.mid"))
    cache = root / "cache"
    prepare([root / "chords", root / "melody"], cache, workers=1, progress=False)
    return cache
