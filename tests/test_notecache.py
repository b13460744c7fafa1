"""The note cache against the dense roll cache of earlier versions: identical Dataset items (same
crops, same shifts, same augmentation), old caches read or refused with the command that rebuilds
them, and a full disk leaving no half-written entry."""
import errno
import json
import multiprocessing
import os
import pickle
import shutil
from pathlib import Path

import music21
import numpy as np
import pytest
import symusic
import torch

from midi_rae import cache as cache_module
from midi_rae.cache import (CacheReader, OldCacheError, _key, collect_sources, is_dense, load_index, load_roll,
                            prepare, split_of, work_key)
from midi_rae.cli import main
from midi_rae.corpus import corpus_root
from midi_rae.dataset import PianoRollDataset
from midi_rae.roll import RollSettings, read_pieces


def write_dense_cache(inputs: Path, cache: Path, settings: RollSettings = RollSettings()) -> None:
    """A cache as earlier versions wrote it: one `(C, 128, T)` uint8 roll per piece under `rolls/`."""
    for sub in ("rolls", "done"):
        (cache / sub).mkdir(parents=True)
    rows = []
    for source in collect_sources([inputs]):
        key = _key(source, settings, 2**26)
        pieces, skipped = read_pieces(source.path, settings)
        multi = source.path.suffix == ".abc" or len(pieces) + len(skipped) > 1
        record = {"source": source.source_id, "pieces": [], "skipped": [[i, r] for i, r in skipped]}
        for p in pieces:
            np.save(cache / "rolls" / f"{key}-{p.index}.npy", p.roll)
            record["pieces"].append({"piece_id": f"{source.source_id}#{p.index}" if multi else source.source_id,
                                     "roll": f"{key}-{p.index}.npy", "steps": p.steps, "collection": source.collection})
        (cache / "done" / f"{key}.json").write_text(json.dumps(record))
        rows += record["pieces"]
    (cache / "pieces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: r["piece_id"])))
    (cache / "settings.json").write_text(json.dumps(settings.__dict__))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random chords with varied velocities (some pieces mostly silent), and real pieces of every
    reader of the bundled corpus: MusicXML chorales, kern masses, ABC folk-song books, MIDI."""
    root = tmp_path_factory.mktemp("inputs") / "in"
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        score, track = symusic.Score(480), symusic.Track("t", 0, False)
        for beat in range(int(rng.integers(4, 90))):
            if i % 4 == 0 and beat % 16:  # sparse: the anchor search has to redraw
                continue
            for pitch in rng.integers(20 + 5 * i, 70 + 5 * i, int(rng.integers(1, 5))):
                track.notes.append(symusic.Note(beat * 240, 240 * int(rng.integers(1, 9)), int(pitch), int(rng.integers(1, 128))))
        score.tracks.append(track)
        score.dump_midi(str(root / f"r{i:02d}.mid"))
    corpus = corpus_root()
    for rel in ("bach/bwv66.6.mxl", "bach/bwv1.6.mxl", "palestrina/Agnus_01.krn", "essenFolksong/teste.abc",
                "essenFolksong/test1.abc", "josquin/milleRegrets.abc"):
        shutil.copy(corpus / rel, root / rel.replace("/", "_"))
    shutil.copy(Path(music21.__file__).parent / "midi" / "testPrimitive" / "test05.mid", root / "test05.mid")
    return root


@pytest.mark.parametrize("settings", [RollSettings(), RollSettings(velocity=True)], ids=["binary", "velocity"])
def test_note_cache_items_equal_dense_cache_items(inputs: Path, tmp_path: Path, settings: RollSettings) -> None:
    notes, dense = tmp_path / "notes", tmp_path / "dense"
    prepare([inputs], notes, settings, workers=2, progress=False)
    write_dense_cache(inputs, dense, settings)
    assert is_dense(dense) and not is_dense(notes)
    # A dense cache of an earlier version splits by the path's work key; the note cache joins the
    # mass whose Agnus the kern file names. Given the same works, the items must be equal.
    works = {p["piece_id"]: p["work"] for p in load_index(notes)}
    assert works["in/palestrina_Agnus_01.krn"] != work_key("in/palestrina_Agnus_01.krn")
    (dense / "pieces.jsonl").write_text("".join(json.dumps({**p, "work": works[p["piece_id"]]}) + "\n" for p in load_index(dense)))
    assert [p["piece_id"] for p in load_index(notes)] == [p["piece_id"] for p in load_index(dense)]
    for p, q in zip(load_index(notes), load_index(dense)):
        np.testing.assert_array_equal(load_roll(notes, p), load_roll(dense, q))
    options = [dict(split="train", crop_width=64, transpose=3, val_fraction=0.25),
               dict(split="val", crop_width=32, val_fraction=0.25),
               dict(split="all", crop_width=48, view_mode="piece", max_time_shift=40, max_pitch_shift=20, seed=3),
               dict(split="all", crop_width=128, pair=False, channels=1, transpose=12)]
    for kw in options:
        a, b = PianoRollDataset(notes, **kw), PianoRollDataset(dense, **kw)
        assert len(a) == len(b) and a.num_pieces == b.num_pieces
        for epoch in (0, 1):
            a.set_epoch(epoch), b.set_epoch(epoch)
            for i in range(len(a)):
                x, y = a[i], b[i]
                assert x.keys() == y.keys()
                for k in x:
                    assert torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k], (kw, i, k)
    val = PianoRollDataset(notes, "val", val_fraction=0.25)
    assert {val.piece_id(i) for i in range(val.num_pieces)} == {p["piece_id"] for p in load_index(notes) if split_of(p["work"], 0.25) == "val"}


def test_reader_holds_numpy_columns_and_pickles_light(inputs: Path, tmp_path: Path) -> None:
    prepare([inputs], tmp_path / "c", workers=1, progress=False)
    reader = CacheReader(tmp_path / "c")
    # memory-mapped (a plain array over the mapping: slicing a np.memmap costs Python calls per item)
    assert isinstance(reader.index.base, np.memmap) and len(reader) == len(load_index(tmp_path / "c"))
    ds = PianoRollDataset(tmp_path / "c", "all")
    # No per-piece Python objects (None: an unused option such as `labels`).
    light = (str, int, float, Path, np.ndarray, RollSettings, CacheReader, type(None))
    assert all(isinstance(v, light) for v in vars(ds).values())
    assert len(pickle.dumps(ds)) < 4000  # a spawned worker gets the path, not the index or the notes
    again = pickle.loads(pickle.dumps(ds))
    assert torch.equal(again[5]["x"], ds[5]["x"])


def test_old_cache_is_read_or_refused_never_deleted(inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    old = tmp_path / "old"
    write_dense_cache(inputs, old)
    before = {f: f.stat().st_mtime_ns for f in old.rglob("*")}
    summary = prepare([inputs], old, progress=False)  # holds every input: used as it is
    assert summary.pieces == len(load_index(old)) and "earlier midi-rae version" in summary.notice
    extra = tmp_path / "more"
    extra.mkdir()
    shutil.copy(inputs / "r00.mid", extra / "new.mid")
    with pytest.raises(OldCacheError, match=r"1 of 20 files are not in it.*run `midi-rae prepare .*in .*more --cache-dir .*old`"):
        prepare([inputs, extra], old, progress=False)
    assert main(["prepare", str(extra), "--cache-dir", str(old)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "move it away" in err and "midi-rae prepare" in err
    assert {f: f.stat().st_mtime_ns for f in old.rglob("*")} == before  # nothing written, nothing deleted


def full_disk(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Writes of cache files under `where` fail half-way with ENOSPC, like a disk filling up."""
    real = cache_module.atomic_write

    def atomic_write(path, write):
        if where not in Path(path).parts:
            return real(path, write)

        def half(tmp: Path) -> None:
            write(tmp)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

        return real(path, half)

    monkeypatch.setattr(cache_module, "atomic_write", atomic_write)


def cache_files(cache: Path) -> dict[str, bytes]:
    return {f.relative_to(cache).as_posix(): f.read_bytes() for f in cache.rglob("*") if f.is_file()}


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="workers must inherit the patched writer")
@pytest.mark.parametrize("where", ["staging", "notes"], ids=["converting", "packing"])
def test_full_disk_leaves_no_half_written_entry(inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture, where: str) -> None:
    cache, src = tmp_path / "c", tmp_path / "src"
    src.mkdir()
    for f in sorted(inputs.glob("r0*.mid"))[:3]:
        shutil.copy(f, src / f.name)
    prepare([src], cache, workers=1, progress=False)
    before = cache_files(cache)
    shutil.copy(inputs / "bach_bwv66.6.mxl", src / "chorale.mxl")
    full_disk(monkeypatch, where)
    assert main(["prepare", str(src), "--cache-dir", str(cache), "--workers", "1", "--quiet"]) == 2
    assert "No space left on device; free some disk space" in capsys.readouterr().err
    after = cache_files(cache)
    assert not [f for f in after if f.endswith(".tmp")]
    # Nothing half-written: the committed cache is the one from before, and the new file has no
    # record unless its notes are complete (staged, waiting to be packed).
    assert {f: b for f, b in after.items() if f in before} == before
    assert all(f.startswith(("staging/", "done/", "notes/")) for f in set(after) - set(before))
    assert len(PianoRollDataset(cache, "all")) == len(PianoRollDataset(cache, "all"))
    assert CacheReader(cache).index.shape == (3,)
    monkeypatch.undo()  # space freed: the next run completes, equal to a fresh cache
    summary = prepare([src], cache, workers=1, progress=False)
    assert summary.processed == (1 if where == "staging" else 0) and summary.pieces == 4
    prepare([src], tmp_path / "fresh", workers=1, progress=False)
    assert cache_files(cache) == cache_files(tmp_path / "fresh")


def test_a_cache_of_the_previous_format_is_refused_then_made_again(inputs: Path, tmp_path: Path, monkeypatch) -> None:
    """Format 1 had no `work` (its split put a mass's sections on both sides): readers refuse it
    in one line that says how to rebuild it, and `prepare` converts every file again."""
    c = tmp_path / "c"
    with monkeypatch.context() as m:
        m.setattr(cache_module, "FORMAT", "midi-rae notes 1")
        prepare([inputs], c, workers=1, progress=False)
    with pytest.raises(ValueError, match=r"format 'midi-rae notes 1'.*rebuild it with `midi-rae prepare --cache-dir"):
        CacheReader(c)
    summary = prepare([inputs], c, workers=1, progress=False)
    assert summary.processed == len(collect_sources([inputs]))
    assert all(p["work"] for p in load_index(c)) and len(CacheReader(c)) == len(load_index(c))
