"""`midi-rae prepare`: hostile inputs, report lines, resume after a kill, idempotence, determinism."""
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import music21
import pytest
import symusic

from midi_rae import cache as prepare_module
from midi_rae.cache import load_index, load_roll, prepare
from midi_rae.cli import main
from midi_rae.corpus import corpus_root

WHEEL_MIDI = Path(music21.__file__).parent / "midi" / "testPrimitive"


def midi(path: Path, pitches: list[int], drums: bool = False) -> Path:
    score = symusic.Score(480)
    track = symusic.Track("t", 0, drums)
    for i, p in enumerate(pitches):
        track.notes.append(symusic.Note(i * 480, 480, p, 90))
    score.tracks.append(track)
    score.dump_midi(str(path))
    return path


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    midi(d / "good.mid", [60, 62, 64])
    shutil.copy(WHEEL_MIDI / "test05.mid", d / "sub" / "real.midi")
    (d / "truncated.mid").write_bytes((WHEEL_MIDI / "test03.mid").read_bytes()[:300])
    (d / "text.mid").write_text("this is not a MIDI file\n")
    (d / "empty.mid").write_bytes(b"")
    midi(d / "drums.mid", [36, 38], drums=True)
    midi(d / "noteless.mid", [])
    (d / "repeats.abc").write_text("X:1\nT:bad\nM:4/4\nL:1/4\nK:C\n|1 ABc :|2 d e |1 f g |]\n")
    (d / "book.abc").write_text("X:1\nT:ok\nM:3/4\nL:1/4\nK:G\nGAB|c3|]\n\nX:2\nT:bad\nK:C\n|1 AB :|2 d |1 f |]\n")
    (d / "notes.txt").write_text("ignored: not a music file")
    return d


EXPECTED_REPORT = [
    "SKIP in/book.abc#1: badly formed repeats (abc2midi: Need || |: :| or ::  to mark end of variant ending)",
    "SKIP in/drums.mid: drum tracks only (no pitched notes)",
    "SKIP in/empty.mid: empty file",
    "SKIP in/noteless.mid: no notes",
    "SKIP in/repeats.abc: badly formed repeats (abc2midi: Need || |: :| or ::  to mark end of variant ending)",
    "SKIP in/text.mid: not a readable MIDI file (MiniMidi: Invaild midi file! File header is not MThd!)",
    "SKIP in/truncated.mid: not a readable MIDI file (MiniMidi: Invalid chunk length 5116 (remaining bytes after header: 190))",
]


def test_hostile_inputs_are_reported(hostile: Path, tmp_path: Path) -> None:
    summary = prepare([hostile], tmp_path / "cache", workers=2, progress=False)
    assert summary.report == EXPECTED_REPORT
    assert (summary.pieces, summary.pieces_skipped, summary.files, summary.files_skipped) == (3, 7, 9, 6)
    report = (tmp_path / "cache" / "report.txt").read_text().splitlines()
    assert report == EXPECTED_REPORT + [summary.line()]
    pieces = load_index(tmp_path / "cache")
    assert [p["piece_id"] for p in pieces] == ["in/book.abc#0", "in/good.mid", "in/sub/real.midi"]
    assert pieces[0]["title"] == "ok" and pieces[0]["time_signature"] == "3/4" and pieces[0]["key"] == "G"
    assert load_roll(tmp_path / "cache", pieces[1]).shape == (2, 128, 12)


def test_twice_is_noop_and_deterministic(hostile: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    prepare([hostile], a, workers=2, progress=False)
    files = {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()}
    again = prepare([hostile], a, workers=2, progress=False)
    assert again.processed == 0 and {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()} == files
    prepare([hostile], b, workers=1, progress=False)
    rel = lambda root: {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert rel(a) == rel(b)


def test_changed_settings_do_not_reuse_rolls(hostile: Path, tmp_path: Path) -> None:
    from midi_rae.roll import RollSettings

    prepare([hostile / "good.mid"], tmp_path / "c", progress=False)
    summary = prepare([hostile / "good.mid"], tmp_path / "c", RollSettings(steps_per_beat=8), progress=False)
    assert summary.processed == 1
    assert load_roll(tmp_path / "c", load_index(tmp_path / "c")[0]).shape == (2, 128, 24)


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="workers must inherit the patched reader")
def test_worker_crash_is_reported(hostile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = prepare_module.read_pieces

    def crashing(path, settings):  # a reader that dies like a segfaulting parser would
        if Path(path).name == "good.mid":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, settings)

    monkeypatch.setattr(prepare_module, "read_pieces", crashing)
    summary = prepare([hostile], tmp_path / "cache", workers=2, progress=False)
    assert "SKIP in/good.mid: the reader crashed (worker process died)" in summary.report
    assert [p["piece_id"] for p in load_index(tmp_path / "cache")] == ["in/book.abc#0", "in/sub/real.midi"]


def test_resume_after_kill(tmp_path: Path) -> None:
    src = tmp_path / "chorales"
    src.mkdir()
    for f in sorted((corpus_root() / "bach").glob("bwv1*.mxl"))[:12]:
        shutil.copy(f, src / f.name)
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "midi_rae", "prepare", str(src), "--cache-dir", str(cache), "--workers", "2", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache.glob("done/*.json"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole run, workers included, mid-file
    proc.wait()
    done_before = len(list((cache / "done").glob("*.json")))
    assert 3 <= done_before < 12
    summary = prepare([src], cache, workers=2, progress=False)
    assert summary.processed == 12 - done_before and summary.pieces == 12
    assert not list(cache.rglob("*.tmp")) and not list(cache.glob("inflight/*"))
    fresh = tmp_path / "fresh"
    prepare([src], fresh, workers=2, progress=False)
    assert (fresh / "pieces.jsonl").read_bytes() == (cache / "pieces.jsonl").read_bytes()
    assert sorted(f.name for f in fresh.rglob("*")) == sorted(f.name for f in cache.rglob("*"))
    for p in load_index(fresh):
        assert (fresh / p["file"]).read_bytes() == (cache / p["file"]).read_bytes()


def test_cli(hostile: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["prepare", str(hostile / "good.mid"), "--cache-dir", str(tmp_path / "c"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "1 pieces good, 0 skipped" in out and "cache: " in out
    assert main(["prepare", str(tmp_path / "missing"), "--cache-dir", str(tmp_path / "c")]) == 2
    with pytest.raises(SystemExit):
        main([])


def test_prepare_and_train_agree_on_the_cache_of_some_collections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from midi_rae.config import load_config
    from midi_rae.runs import resolve_cache_dir

    monkeypatch.setenv("MIDI_RAE_CACHE", str(tmp_path))
    monkeypatch.setattr(prepare_module, "corpus_files", lambda collections=None: [])  # only the folder matters here
    summary = prepare(None, None, workers=1, progress=False, collections=["essenFolksong"])
    cfg = load_config(None, ["data.collections=[essenFolksong]"])
    assert summary.cache_dir == resolve_cache_dir(cfg) != tmp_path / "corpus"  # a subset never takes the full corpus's name
    assert resolve_cache_dir(load_config(None)) == tmp_path / "corpus"
