"""The bundled music21 corpus: enumeration, and real pieces of each format with their metadata."""
import numpy as np

from midi_rae.corpus import corpus_files, corpus_root
from midi_rae.roll import read_pieces


def test_corpus_pieces_with_metadata() -> None:
    root = corpus_root()
    [bach], _ = read_pieces(root / "bach" / "bwv66.6.mxl")
    assert bach.roll.shape[:2] == (2, 128) and bach.meta["time_signature"] == "4/4"
    assert bach.meta["key"] == "F# minor" and bach.meta["format"] == "mxl"
    # Four voices: most columns have 4 sounding notes; every note starts on an onset.
    assert np.median(bach.roll[0].sum(axis=0)) == 4
    assert not (bach.roll[1] & ~bach.roll[0]).any()
    [krn], _ = read_pieces(root / "palestrina" / "Agnus_01.krn")
    assert krn.meta["time_signature"] == "4/2" and krn.roll[0].any()
    tunes, skipped = read_pieces(root / "josquin" / "milleRegrets.abc")
    assert len(tunes) == 4 and not skipped and tunes[0].meta["title"] == "Mille regrets"


def test_corpus_enumeration() -> None:
    files = corpus_files()
    collections = {f.collection for f in files}
    assert {"bach", "essenFolksong", "palestrina", "monteverdi"} <= collections
    assert "demos" not in collections and len(files) > 3000
    assert all(f.source_id.startswith("music21/") for f in files)
    assert [f.source_id for f in files] == sorted(f.source_id for f in files)
