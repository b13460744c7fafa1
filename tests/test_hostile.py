"""Hostile inputs and user errors: each bad file becomes one report line while the rest convert,
and each user error becomes one `midi-rae CMD: error: ...` line (no traceback) that says what to change.
Every input is made here, by the test."""
import errno
import os
import pathlib
import tracemalloc
from pathlib import Path

import pytest
import symusic

from midi_rae.cli import main
from midi_rae.prepare import prepare


def midi(path: Path, pitches: list[int]) -> Path:
    score = symusic.Score(480)
    track = symusic.Track("t", 0, False)
    for i, p in enumerate(pitches):
        track.notes.append(symusic.Note(i * 480, 480, p, 90))
    score.tracks.append(track)
    score.dump_midi(str(path))
    return path


def error_line(capsys: pytest.CaptureFixture, command: str) -> str:
    """The one line a failed command wrote to stderr (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"midi-rae {command}: error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- prepare: files that cannot be read


def test_non_utf8_file_name_is_one_report_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "in"
    src.mkdir()
    midi(src / "good.mid", [60, 62])
    midi(Path(os.fsdecode(bytes(src) + b"/bad\xff.mid")), [64])
    assert main(["prepare", str(src), "--cache-dir", str(tmp_path / "c"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "SKIP in/bad\\xff.mid: the file name is not valid UTF-8; rename the file" in out
    assert "1 pieces good, 1 skipped (1/2 files readable)" in out


def test_unreadable_file_is_one_report_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "in"
    src.mkdir()
    midi(src / "good.mid", [60, 62])
    locked = midi(src / "locked.mid", [64])
    # Tests run as root, which chmod cannot lock out: refuse the file as the kernel would.
    real_open = pathlib.Path.open

    def refusing_open(self: Path, *args, **kwargs):
        if self.name == locked.name:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", refusing_open)
    summary = prepare([src], tmp_path / "c", workers=1, progress=False)
    assert summary.report == ["SKIP in/locked.mid: cannot read the file (Permission denied); check its permissions"]
    assert summary.pieces == 1


def test_huge_file_is_refused_and_hashed_in_chunks(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    midi(src / "good.mid", [60, 62])
    huge = src / "huge.mid"
    with huge.open("wb") as f:
        f.truncate(100 * 2**20)  # sparse: costs no disk
    summary = prepare([src], tmp_path / "c", workers=1, progress=False)
    assert summary.report == ["SKIP in/huge.mid: too large: 100 MB (limit 64 MB; raise it with --max-file-mb)"]
    assert summary.pieces == 1
    # Allowed in, it is hashed in chunks: memory stays far below the file's size.
    tracemalloc.start()
    try:
        summary = prepare([src], tmp_path / "c2", workers=1, progress=False, max_file_mb=200)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20
    assert summary.report[0].startswith("SKIP in/huge.mid: not a readable MIDI file")


def test_prepare_with_no_good_piece_fails(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "text.mid").write_text("not a MIDI file\n")
    assert main(["prepare", str(tmp_path / "text.mid"), "--cache-dir", str(tmp_path / "c"), "--quiet"]) == 1
    assert "none of the 1 files gave a usable piece" in error_line(capsys, "prepare")
