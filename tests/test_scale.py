"""A generated corpus (benchmarks/make_corpus.py, the small version of the scale test) through
`midi-rae prepare` and into a Dataset: every good file a piece, every broken one reported."""
import importlib.util
import os
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from midi_rae import cache as cache_module
from midi_rae.cache import load_index, load_roll
from midi_rae.cli import main
from midi_rae.dataset import PianoRollDataset
from midi_rae.roll import midi_to_roll

spec = importlib.util.spec_from_file_location("make_corpus", Path(__file__).parents[1] / "benchmarks" / "make_corpus.py")
make_corpus = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_corpus)


def test_generated_corpus_prepares(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paths = make_corpus.make_corpus(tmp_path / "gen", 200, seed=0, bad_every=50)
    again = make_corpus.make_corpus(tmp_path / "gen2", 200, seed=0, bad_every=50)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]  # the seed fixes the corpus
    cache = tmp_path / "cache"
    assert main(["prepare", str(tmp_path / "gen"), "--cache-dir", str(cache), "--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert "prepare: 100%" in captured.err and "200/200" in captured.err  # the progress bar
    skips = [l for l in captured.out.splitlines() if l.startswith("SKIP")]
    assert skips == ["SKIP gen/0000/piece000049.mid: not a readable MIDI file (MiniMidi: Invaild midi file! File header is not MThd!)",
                     "SKIP gen/0000/piece000099.mid: not a readable MIDI file (MiniMidi: Invalid chunk length 466 (remaining bytes after header: 222))",
                     "SKIP gen/0000/piece000149.mid: not a readable MIDI file (MiniMidi: Invaild midi file! File header is not MThd!)",
                     "SKIP gen/0000/piece000199.mid: not a readable MIDI file (MiniMidi: Invalid chunk length 407 (remaining bytes after header: 192))"]
    assert "196 pieces good, 4 skipped (196/200 files readable)" in captured.out
    index = load_index(cache)
    assert len(index) == 196 and not list((cache / "staging").iterdir()) and not list((cache / "done").iterdir())
    good = next(p for p in paths if p.name == "piece000007.mid")
    np.testing.assert_array_equal(load_roll(cache, next(p for p in index if p["piece_id"].endswith("piece000007.mid"))),
                                  midi_to_roll(good))
    ds = PianoRollDataset(cache, "train")
    assert ds[0]["x"].shape == (2, 128, 128) and ds.num_pieces + PianoRollDataset(cache, "val").num_pieces == 196


def test_prepare_queues_a_few_files_per_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished future holds its file's record until it is reaped: queueing a 100k-file corpus at
    once held every record in memory. At most four files per worker wait at any time."""
    make_corpus.make_corpus(tmp_path / "gen", 40, seed=0)
    most, pending, lock = [], set(), threading.Lock()  # futures not yet done (callbacks run in another thread)

    def finished(future) -> None:
        with lock:
            pending.discard(future)

    class Counting(cache_module.ProcessPoolExecutor):
        def submit(self, *args, **kwargs):
            future = super().submit(*args, **kwargs)
            with lock:
                pending.add(future)
                most.append(len(pending))
            future.add_done_callback(finished)
            return future

    monkeypatch.setattr(cache_module, "ProcessPoolExecutor", Counting)
    summary = cache_module.prepare([tmp_path / "gen"], tmp_path / "cache", workers=1, progress=False)
    assert summary.pieces == 40 and len(most) == 40 and max(most) <= 4


def test_keys_and_the_done_table_hold_no_per_file_python_objects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashing a file builds no Path (a Path interns every part of its name for the life of the
    process: about 200 bytes per file), and the finished records are found through sorted numpy
    arrays of keys, including records converted after the last pack."""
    make_corpus.make_corpus(tmp_path / "gen", 12, seed=0)
    cache = tmp_path / "cache"
    assert main(["prepare", str(tmp_path / "gen"), "--cache-dir", str(cache), "--workers", "1"]) == 0
    sources = cache_module.collect_sources([tmp_path / "gen"])
    monkeypatch.setattr(cache_module.Source, "path", property(lambda s: pytest.fail("a Path was built")))
    keys = [cache_module._key(s, cache_module.RollSettings(), 1 << 20) for s in sources]
    assert [s.suffix for s in sources] == [".mid"] * 12
    assert [cache_module.Source(f, "x").suffix for f in ("a/x.", "a/.mid", "a.b/c", "x.MID")] == ["", "", "", ".MID"]
    monkeypatch.undo()
    (cache / "done" / "0000000000000000000a.json").write_text('{"key": "0000000000000000000a", "fresh": 1}')
    done = cache_module._Done(cache)
    try:
        assert done.packed.dtype.kind == "S" and list(done.packed) == sorted(done.packed) and len(done.packed) == 12
        assert all(k in done for k in keys) and done[keys[3]]["key"] == keys[3]
        assert "0000000000000000000a" in done and done["0000000000000000000a"]["fresh"] == 1
        assert "ffffffffffffffffffff" not in done
        with pytest.raises(KeyError):
            done["ffffffffffffffffffff"]
    finally:
        done.close()


def test_the_source_list_is_columns_in_id_order() -> None:
    """`Sources` gives back every path and id as given (a file name that is not UTF-8 too), in
    source id order, the last of equal ids kept; it holds no Python object per file: built from
    20,000 rows, it keeps little more than the bytes of their names."""
    odd = os.fsdecode(b"gen/caf\xe9.mid")  # a Latin-1 name: surrogate escapes in the str
    rows = [("/data/b.mid", "gen/b.mid", "gen", None), ("/data/" + odd, odd, "gen", None),
            ("/x/a.mid", "a.mid", None, "Bach"), ("/y/b.mid", "gen/b.mid", "gen", "Later")]
    sources = cache_module.Sources(iter(rows))
    assert [(s.file, s.source_id, s.collection, s.composer) for s in sources] == [
        ("/x/a.mid", "a.mid", None, "Bach"), ("/y/b.mid", "gen/b.mid", "gen", "Later"), ("/data/" + odd, odd, "gen", None)]
    assert len(sources) == 3 and sources[1] == cache_module.Source("/y/b.mid", "gen/b.mid", "gen", "Later")
    assert len(cache_module.Sources(iter([]))) == 0

    n = 20_000
    rows = ((f"/corpus/{i % 97:04d}/piece{i:06d}.mid", f"corpus/{i % 97:04d}/piece{i:06d}.mid", "corpus", None)
            for i in range(n))
    name_bytes = n * (len("/corpus/0000/piece000000.mid") + len("corpus/0000/piece000000.mid"))
    tracemalloc.start()
    try:
        sources = cache_module.Sources(rows)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(sources) == n and sources[n - 1].source_id == "corpus/0096/piece019981.mid"
    assert held < name_bytes + 48 * n  # a Source per file held about 300 bytes beside its names
