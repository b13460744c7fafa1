"""Hostile inputs and user errors: each bad file becomes one report line while the rest convert,
and each user error becomes one `midi-rae CMD: error: ...` line (no traceback) that says what to change.
Every input is made here, by the test."""
import builtins
import errno
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import symusic
import torch
from tiny_runs import trained_run

from midi_rae import plots, utils
from midi_rae.cache import CacheReader, prepare
from midi_rae.cli import main
from midi_rae.reconstruct import comparison_png
from midi_rae.roll import RollSettings, score_to_roll
from midi_rae.swin import SwinDecoder, SwinEncoder, SwinMAEDecoder
from midi_rae.vit import ViTEncoder
from test_notecache import write_dense_cache
from test_prepare import midi


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
    # Tests run as root, which chmod cannot lock out: refuse the file as the kernel would,
    # whether it is opened through a Path or by its name.
    real_path_open, real_open = pathlib.Path.open, builtins.open

    def refusing(real):
        def opener(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.path.basename(file) == locked.name:
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real(file, *args, **kwargs)
        return opener

    monkeypatch.setattr(pathlib.Path, "open", refusing(real_path_open))
    monkeypatch.setattr(builtins, "open", refusing(real_open))
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


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow  # a subprocess importing torch: about 5 s on 2 busy cores
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_prepare_worker_dies_with_its_parent(tmp_path: Path) -> None:
    midi(tmp_path / "slow.mid", [60])
    pid_file = tmp_path / "worker.pid"
    script = textwrap.dedent("""
        import os, sys, time
        from midi_rae import cache as prepare_module
        def slow(path, settings):  # a conversion that takes a minute
            open(sys.argv[2], "w").write(str(os.getpid()))
            time.sleep(60)
        prepare_module.read_pieces = slow
        prepare_module.prepare([sys.argv[1]], sys.argv[3], workers=1, progress=False)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "slow.mid"), str(pid_file), str(tmp_path / "c")],
                              start_new_session=True)
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    worker = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    deadline = time.time() + 5
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    orphaned = _alive(worker)
    if orphaned:
        os.kill(worker, signal.SIGKILL)
    assert not orphaned



def test_run_with_no_good_piece_fails(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "text.mid").write_text("not a MIDI file\n")
    assert main(["run", f"data.paths=[{tmp_path / 'text.mid'}]", f"data.cache_dir={tmp_path / 'c'}",
                 f"out_dir={tmp_path / 'runs'}", "train.progress=false"]) == 2
    assert "none of the 1 input files gave a usable piece" in error_line(capsys, "run")

# ----------------------------------------------------------------------------- rolls: memory follows the roll


@pytest.mark.slow  # a subprocess importing torch: about 6 s on 2 busy cores
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmSize from /proc")
def test_many_tracks_convert_in_bounded_memory() -> None:
    """A 34 KB MIDI with 1000 tracks and 188k steps (under the step limit): rendering every track
    apart would ask for 48 GB; the merged roll is 48 MB. Run under a 1 GB address-space cap."""
    script = textwrap.dedent("""
        import resource
        import symusic
        from midi_rae.roll import midi_to_roll
        score = symusic.Score(480)
        for i in range(1000):
            track = symusic.Track(f"t{i}", 0, False)
            track.notes.append(symusic.Note(i * 480, 480, 40 + i % 60, 90))
            score.tracks.append(track)
        score.tracks[-1].notes.append(symusic.Note(47_000 * 480, 480, 60, 90))
        vsz = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (vsz + 2**30, vsz + 2**30))
        print(midi_to_roll(score.dumps_midi()).shape)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "(2, 128, 188004)"


@pytest.mark.parametrize("velocity", [False, True])
def test_merged_roll_is_the_union_of_track_rolls(velocity: bool) -> None:
    rng = np.random.default_rng(0)
    score = symusic.Score(480)
    for i in range(5):
        track = symusic.Track(f"t{i}", 0, False)
        for _ in range(40):  # overlapping notes across tracks, odd durations, velocities 1..127
            track.notes.append(symusic.Note(int(rng.integers(0, 40 * 480)), int(rng.integers(30, 4 * 480)),
                                            int(rng.integers(55, 70)), int(rng.integers(1, 128))))
        track.notes.sort()
        score.tracks.append(track)
    settings = RollSettings(velocity=velocity)
    roll = score_to_roll(score, settings)
    expected = np.zeros_like(roll)
    for track in score.tracks:
        alone = symusic.Score(480)
        alone.tracks.append(track)
        part = score_to_roll(alone, settings)
        expected[..., : part.shape[-1]] = np.maximum(expected[..., : part.shape[-1]], part)
    np.testing.assert_array_equal(roll, expected)


# ----------------------------------------------------------------------------- user errors: one line each


@pytest.fixture(scope="module")
def run_dir(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run("swin", tiny_cache, tmp_path_factory)


@pytest.fixture
def piece(tmp_path: Path) -> Path:
    return midi(tmp_path / "piece.mid", [60, 62, 64, 65, 67])


def test_weights_file_that_is_not_safetensors(tmp_path: Path, piece: Path, capsys: pytest.CaptureFixture) -> None:
    fake = tmp_path / "encoder.safetensors"
    fake.write_text("not weights")
    assert main(["encode", str(fake), str(piece), "-o", str(tmp_path / "out")]) == 2
    assert "is not a safetensors weights file" in error_line(capsys, "encode")


@pytest.mark.parametrize("text, problem", [("train: {lr: [1\n", "not plain YAML at line 2"),
                                           ("train: !!python/object:os.system {}\n", "could not determine a constructor")])
def test_malformed_yaml(tmp_path: Path, text: str, problem: str, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    assert main(["train", "-c", str(tmp_path / "bad.yaml")]) == 2
    assert problem in error_line(capsys, "train")


def test_folder_given_as_config_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "-c", str(tmp_path)]) == 2
    assert error_line(capsys, "train").endswith("Is a directory; it is a folder: give a file name")


@pytest.mark.parametrize("override, problem", [
    ("model.window_size=0", "model.window_size must be a positive n or [pitch, time] tokens"),
    ("model.window_size=[4,0]", "model.window_size must be a positive n or [pitch, time] tokens, got [4, 0]"),
    ("model.window_size=[4,8,8]", "model.window_size must be a positive n or [pitch, time] tokens"),
    ("model.drop_path_rate=2", "model.drop_path_rate must be in [0, 1)"),
    ("model.num_heads=[1,0,2,4]", "model.num_heads must be positive"),
    ("model.mae_decoder_heads=0", "must be positive"),
    ("decoder.num_heads=[1,3,4,8] decoder.depths=[1,1,1,1]", "not divisible by decoder.num_heads[1] = 3"),
    ("name=..", "name must be a plain folder name"),
])
def test_config_refused_before_data_loading(tmp_path: Path, override: str, problem: str,
                                            capsys: pytest.CaptureFixture) -> None:
    # The cache does not exist: an error about the config must come first.
    assert main(["train", *override.split(), f"data.cache_dir={tmp_path / 'none'}",
                 f"out_dir={tmp_path}"]) == 2
    assert problem in error_line(capsys, "train")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(run_dir: Path, piece: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["reconstruct", str(run_dir), str(piece), "-o", str(tmp_path / "o.mid"), "--device", "cuda"]) == 2
    assert "no CUDA GPU is visible here; use --device cpu" in error_line(capsys, "reconstruct")


def test_out_is_an_existing_folder(run_dir: Path, piece: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "o.mid").mkdir()
    assert main(["reconstruct", str(run_dir), str(piece), "-o", str(tmp_path / "o.mid")]) == 2
    assert error_line(capsys, "reconstruct").endswith(f"{tmp_path / 'o.mid'}: Is a directory; it is a folder: give a file name")


def test_png_in_missing_folder(run_dir: Path, piece: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["reconstruct", str(run_dir), str(piece), "-o", str(tmp_path / "o.mid"),
                 "--png", str(tmp_path / "nowhere" / "x.png")]) == 2
    line = error_line(capsys, "reconstruct")
    assert f"{tmp_path / 'nowhere'}: no such folder" in line and ".tmp" not in line
    assert not (tmp_path / "o.mid").exists()  # checked before any work


@pytest.mark.parametrize("code, hint", [(errno.ENOSPC, "free some disk space"), (errno.EACCES, "check its permissions")])
def test_write_failure_keeps_the_old_file(run_dir: Path, piece: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          code: int, hint: str, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o.mid"
    out.write_bytes(b"previous result")

    def failing_replace(src: str, dst: str) -> None:  # the disk fills up (or refuses) as the file is committed
        raise OSError(code, os.strerror(code), str(src))

    monkeypatch.setattr(utils.os, "replace", failing_replace)
    assert main(["reconstruct", str(run_dir), str(piece), "-o", str(out)]) == 2
    line = error_line(capsys, "reconstruct")
    assert line.startswith(f"midi-rae reconstruct: error: {out}: {os.strerror(code)}; {hint}")
    assert out.read_bytes() == b"previous result" and not list(tmp_path.glob(".*.tmp"))


def test_reconstruct_figure_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 7-hour piece (200k steps, within the step limit) drew 782 rows: over 10 minutes and 4 GB."""
    drawn = {}

    def record(target: np.ndarray, probs: np.ndarray, path: Path, threshold: float, title: str, labels: list[str]) -> Path:
        drawn.update(rows=target.shape[0], title=title, last=labels[-1])
        return Path(path)

    monkeypatch.setattr(plots, "recon_figure", record)
    roll = np.zeros((128, 200_000), dtype=np.float32)
    comparison_png(roll, roll, tmp_path / "x.png", 0.5, "piece: input vs reconstruction")
    assert drawn == {"rows": 16, "title": "piece: input vs reconstruction (first 4096 of 200000 steps)",
                     "last": "steps 3840-4096"}


# ----------------------------------------------------------------------------- found by a hostile-input sweep


def test_reconstruct_refuses_to_overwrite_its_input(run_dir: Path, piece: Path, capsys: pytest.CaptureFixture) -> None:
    before = piece.read_bytes()
    assert main(["reconstruct", str(run_dir), str(piece), "-o", str(piece.parent / "." / piece.name)]) == 2
    assert "is the input file, which would be overwritten; give another name" in error_line(capsys, "reconstruct")
    assert piece.read_bytes() == before


@pytest.mark.parametrize("command", ["reconstruct", "eval"])
@pytest.mark.parametrize("threshold", ["1.5", "-1", "nan"])
def test_threshold_outside_zero_one_is_refused(run_dir: Path, piece: Path, tmp_path: Path, command: str, threshold: str,
                                               capsys: pytest.CaptureFixture) -> None:
    args = [str(piece), "-o", str(tmp_path / "o.mid")] if command == "reconstruct" else ["-o", str(tmp_path / "e")]
    assert main([command, str(run_dir), *args, "--threshold", threshold]) == 2
    assert "note probability, in [0, 1)" in error_line(capsys, command)


def test_midi_with_zero_ticks_per_quarter_is_one_line(run_dir: Path, piece: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    data = bytearray(piece.read_bytes())
    assert data[:4] == b"MThd"
    data[12:14] = b"\x00\x00"  # the header's division: 0 ticks per quarter note
    bad = tmp_path / "tpq0.mid"
    bad.write_bytes(bytes(data))
    assert main(["encode", str(run_dir), str(bad), "-o", str(tmp_path / "e.safetensors")]) == 2
    assert "not a readable MIDI file (its header gives 0 ticks per quarter note)" in error_line(capsys, "encode")


def test_encode_skips_a_bad_input_among_several_and_keeps_same_named_pieces_apart(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = midi(tmp_path / "a" / "x.mid", [60, 62]), midi(tmp_path / "b" / "x.mid", [64, 65, 67, 69])
    (tmp_path / "broken.mid").write_bytes(b"MThd\x00\x00")
    out = tmp_path / "out"
    assert main(["encode", str(run_dir), str(first), str(tmp_path / "broken.mid"), str(second), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"SKIP {tmp_path / 'broken.mid'}: not a readable MIDI file" in err
    assert "1 of 3 inputs skipped (above); 2 pieces encoded" in err
    assert sorted(p.name for p in out.iterdir()) == ["a_x.safetensors", "b_x.safetensors"]


def test_encode_to_an_unwritable_place_is_one_line(run_dir: Path, piece: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def refused(self: Path, data: bytes) -> int:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(pathlib.Path, "write_bytes", refused)
    out = tmp_path / "e.safetensors"
    assert main(["encode", str(run_dir), str(piece), "-o", str(out)]) == 2
    assert error_line(capsys, "encode").endswith(f"{out}: Permission denied; check its permissions or choose another path")


def test_prepare_refuses_a_folder_that_is_not_a_cache_and_deletes_nothing(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "in"
    src.mkdir()
    midi(src / "good.mid", [60, 62])
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "thesis.txt").write_text("years of work")
    (mine / "report.txt").write_text("mine too")
    assert main(["prepare", str(src), "--cache-dir", str(mine), "--workers", "1"]) == 2
    assert "is not a midi-rae cache (it holds notes, report.txt); give a new or empty folder" in error_line(capsys, "prepare")
    assert (mine / "notes" / "thesis.txt").read_text() == "years of work" and (mine / "report.txt").read_text() == "mine too"
    # An empty folder, and a cache already there, are fine.
    (tmp_path / "empty").mkdir()
    for cache in ("empty", "empty"):
        assert main(["prepare", str(src), "--cache-dir", str(tmp_path / cache), "--workers", "1", "--quiet"]) == 0


def _shard(cache: Path) -> Path:
    return sorted((cache / "notes").glob("*.npy"))[0]


@pytest.mark.parametrize("damage, problem", [
    (lambda c: (c / "index.json").unlink(), "is damaged or unfinished: index.json is missing; run `midi-rae prepare"),
    (lambda c: (c / "index.json").write_text("{bad"), "is damaged: its index does not read"),
    (lambda c: next(c.glob("index-*.npy")).write_bytes(b""), "is damaged: its index does not read"),
    (lambda c: (c / "settings.json").write_text('{"steps_per_beat": "x"}'), "settings.json is damaged"),
    (lambda c: _shard(c).write_bytes(b"garbage"), "is missing or not a whole notes array; delete"),
    (lambda c: _shard(c).write_bytes(_shard(c).read_bytes()[:200]), "is missing or not a whole notes array; delete"),
    (lambda c: _shard(c).unlink(), "is missing or not a whole notes array; delete"),
])
def test_damaged_cache_is_one_line_naming_the_fix(tiny_cache: Path, tmp_path: Path, damage: Any, problem: str,
                                                  capsys: pytest.CaptureFixture) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    damage(cache)
    assert main(["train", "data.crop_width=32", f"data.cache_dir={cache}", f"out_dir={tmp_path / 'runs'}",
                 "train.max_steps=1"]) == 2
    assert problem in error_line(capsys, "train")
    assert not (tmp_path / "runs").exists()  # refused before the run folder is made


def test_preparing_again_mends_a_damaged_index(tiny_cache: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    next(cache.glob("index-*.npy")).write_bytes(b"")  # same name, the bytes gone: the cache's own name kept it
    prepare([tiny_cache.parent], cache, workers=1, progress=False)  # the inputs tiny_cache was made of
    assert len(CacheReader(cache)) == len(CacheReader(tiny_cache))


@pytest.mark.parametrize("config, override, problem", [
    ("- a\n- b\n", "name=x", "config must be a mapping of keys to values"),
    (None, "model.depths=[1,x", "model.depths: '[1,x' is not a list; write it as model.depths=[1,2,3]"),
])
def test_config_errors_with_overrides_are_one_line(tmp_path: Path, config: str | None, override: str, problem: str,
                                                   capsys: pytest.CaptureFixture) -> None:
    args = ["train", "--print-config", override]
    if config is not None:
        (tmp_path / "list.yaml").write_text(config)
        args += ["-c", str(tmp_path / "list.yaml")]
    assert main(args) == 2
    assert problem in error_line(capsys, "train")


def test_eval_without_a_decoder_names_the_run(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "decoder" / "decoder.safetensors").unlink()
    assert main(["eval", str(run), "-o", str(tmp_path / "e")]) == 2
    assert error_line(capsys, "eval") == (f"midi-rae eval: error: {run} has no decoder: run `midi-rae train-decoder` on it "
                                          f"(or `midi-rae run`), then pass the run folder")


@pytest.mark.parametrize("args, problem", [(["--level", "99"], "level 99 is out of range for"),
                                           (["--level", "x"], "--level must be a level number"),
                                           (["--l2", "-1"], "the L2 penalty must be positive")])
def test_probe_options_out_of_range(run_dir: Path, tiny_cache: Path, args: list[str], problem: str,
                                    capsys: pytest.CaptureFixture) -> None:
    assert main(["probe", str(run_dir), "--cache-dir", str(tiny_cache), "--no-random", *args]) == 2
    assert problem in error_line(capsys, "probe")


def test_a_run_refuses_its_own_cache_once_prepared_again_from_other_inputs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, other = tmp_path / "src", tmp_path / "other"
    for folder, base in ((src, 48), (other, 60)):
        folder.mkdir()
        for i in range(6):
            midi(folder / f"p{i}.mid", [base + (i + k) % 12 for k in range(40)])
    cache = tmp_path / "cache"
    assert main(["prepare", str(src), "--cache-dir", str(cache), "--workers", "1", "--quiet"]) == 0
    tiny_run = ["name=r", f"out_dir={tmp_path / 'runs'}", f"data.cache_dir={cache}", "data.crop_width=32",
                "data.val_fraction=0.4", "data.val_max_items=4", "model.embed_dim=8", "model.depths=[1,1]",
                "model.num_heads=[1,2]", "model.window_size=4", "model.mae_decoder_dim=16", "model.mae_decoder_heads=2",
                "train.batch_size=2", "train.max_steps=1", "train.warmup_steps=0", "train.progress=false",
                "train.threads=1", "decoder_train.batch_size=2", "decoder_train.max_steps=1",
                "decoder_train.warmup_steps=0", "decoder_train.progress=false", "decoder_train.threads=1"]
    assert main(["train", *tiny_run]) == 0
    assert main(["prepare", str(other), "--cache-dir", str(cache), "--workers", "1", "--quiet"]) == 0  # replaces it
    capsys.readouterr()
    assert main(["train-decoder", *tiny_run]) == 2
    assert f"the cache {cache} was prepared again since r trained on it" in error_line(capsys, "train-decoder")
    assert main(["levels", str(tmp_path / "runs" / "r"), "--subsets", "1", "--steps", "1"]) == 2
    assert f"the cache {cache} was prepared again since r trained on it" in error_line(capsys, "levels")
    # Preparing the run's own inputs again gives the same cache back, and the run reads it.
    assert main(["prepare", str(src), "--cache-dir", str(cache), "--workers", "1", "--quiet"]) == 0
    assert main(["train-decoder", *tiny_run]) == 0


@pytest.mark.parametrize("command, args, problem", [
    ("prepare", ["--workers", "0"], "--workers must be at least 1"),
    ("prepare", ["--max-file-mb", "-1"], "--max-file-mb positive"),
    ("encode", ["PIECE", "-o", "OUT", "--hop", "0"], "hop must be a multiple of"),
    ("eval", ["-o", "OUT", "--max-items", "0"], "need max_items >= 1"),
    ("levels", ["--batch-size", "0"], "--batch-size must be at least 1"),
    ("probe", ["--crops-per-piece", "0"], "need crops_per_piece"),
])
def test_counts_of_zero_are_refused_not_taken_as_the_default(run_dir: Path, piece: Path, tmp_path: Path, command: str,
                                                             args: list[str], problem: str,
                                                             capsys: pytest.CaptureFixture) -> None:
    args = [str(piece) if a == "PIECE" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    target = [str(piece.parent), "--cache-dir", str(tmp_path / "c")] if command == "prepare" else [str(run_dir)]
    assert main([command, *target, *args]) == 2
    assert problem in error_line(capsys, command)


@pytest.mark.parametrize("build, problem", [
    (lambda: SwinEncoder(128, 128, embed_dim=0), "SwinEncoder: embed_dim must be positive, got 0"),
    (lambda: SwinEncoder(128, 128, patch_h=0), "SwinEncoder: patch_h must be positive, got 0"),
    (lambda: SwinEncoder(128, 128, num_heads=(1, 0, 2, 4, 8, 16)), "num_heads must be positive (every entry)"),
    (lambda: SwinEncoder(128, 128, window_size=(8, -1)), "window_size must be positive (every entry), got (8, -1)"),
    (lambda: SwinEncoder(128, 128, mlp_ratio=0), "mlp_ratio must be positive"),
    (lambda: ViTEncoder(128, 128, embed_dim=-32), "ViTEncoder: embed_dim must be positive, got -32"),
    (lambda: ViTEncoder(128, 128, patch_w=0), "ViTEncoder: patch_w must be positive"),
    (lambda: ViTEncoder(128, 128, depth=0), "ViTEncoder: depth must be positive"),
    (lambda: ViTEncoder(128, 128, num_heads=0), "ViTEncoder: num_heads must be positive"),
    (lambda: SwinMAEDecoder(num_levels=6, read_levels=0), "read_levels must be 1..6"),
    (lambda: SwinMAEDecoder(num_levels=6, read_levels=7), "read_levels must be 1..6"),
    # a negative rate built and was read as 0 (no stochastic depth, no dropout), silently
    (lambda: SwinEncoder(128, 128, drop_path_rate=-0.1), "SwinEncoder: drop_path_rate must be in [0, 1), got -0.1"),
    (lambda: SwinEncoder(128, 128, attn_drop_rate=1.0), "SwinEncoder: attn_drop_rate must be in [0, 1), got 1.0"),
    (lambda: SwinDecoder(drop_path_rate=-0.2), "SwinDecoder: drop_path_rate must be in [0, 1), got -0.2"),
    (lambda: ViTEncoder(128, 128, drop_rate=-0.5), "ViTEncoder: drop_rate must be in [0, 1), got -0.5"),
])
def test_impossible_model_sizes_are_refused_when_built(build: Any, problem: str) -> None:
    """From Python, where no config checks them: a zero size built, or failed later as torch's own error."""
    with pytest.raises(ValueError) as e:
        build()
    assert problem in str(e.value)


@pytest.mark.parametrize("encoder", [SwinEncoder(128, 32, embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=4),
                                     ViTEncoder(128, 32, patch_h=8, patch_w=8, embed_dim=16, depth=1, num_heads=2)],
                         ids=["swin", "vit"])
def test_float64_roll_is_refused_in_one_line(encoder: torch.nn.Module) -> None:
    roll = torch.rand(2, 1, 128, 32, dtype=torch.float64)  # torch.from_numpy of numpy's default dtype
    with pytest.raises(ValueError, match=r"has torch.float32 weights but got a torch.float64 piano roll; "
                                         r"pass x.to\(torch.float32\)"):
        encoder(roll)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the other float dtypes itself
        assert torch.isfinite(encoder(roll.bfloat16()).latent).all()


def test_prepare_refuses_paths_with_collections(piece: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["prepare", str(piece), "--collections", "bach", "--cache-dir", str(tmp_path / "c")]) == 2
    assert "give either PATHs or --collections, not both" in error_line(capsys, "prepare")
    assert not (tmp_path / "c").exists()


def test_prepare_api_refuses_counts_of_zero(piece: Path, tmp_path: Path) -> None:
    """The API checks them, not only the CLI: workers=0 passed for "the default" (all cores)."""
    for kw in (dict(workers=0), dict(max_file_mb=0)):
        with pytest.raises(ValueError, match="--workers must be at least 1 and --max-file-mb positive"):
            prepare([piece], tmp_path / "c", progress=False, **kw)
    assert not (tmp_path / "c").exists()


def test_old_dense_cache_counts_refused_files_apart(piece: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    old = tmp_path / "old"
    write_dense_cache(piece.parent, old)
    with (tmp_path / "huge.mid").open("wb") as f:
        f.truncate(100 * 2**20)  # sparse: refused for its size before it is read
    assert main(["prepare", str(tmp_path), "--cache-dir", str(old), "--workers", "1", "--quiet"]) == 0
    assert "0 files converted in this run, 1 were already in the cache, 1 refused before reading" in capsys.readouterr().out


def test_reconstruct_refuses_an_out_that_is_not_midi(run_dir: Path, piece: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    assert main(["reconstruct", str(run_dir), str(piece), "-o", str(tmp_path / "x.png")]) == 2
    assert "the reconstruction is written as MIDI, give a .mid name" in error_line(capsys, "reconstruct")
    assert not (tmp_path / "x.png").exists()


def test_encode_refuses_an_out_file_that_is_not_safetensors(run_dir: Path, piece: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out" / "h.txt"
    assert main(["encode", str(run_dir), str(piece), "-o", str(out)]) == 2
    assert f"give {out.with_suffix('.safetensors')} for one piece" in error_line(capsys, "encode")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, args", [("eval", ["-o", "OUT"]), ("probe", ["--no-random"]),
                                           ("levels", ["--no-random", "-o", "OUT", "--subsets", "1", "--steps", "1"])])
def test_a_cache_on_another_grid_says_what_the_command_can_change(run_dir: Path, piece: Path, tmp_path: Path, command: str,
                                                                  args: list[str], capsys: pytest.CaptureFixture) -> None:
    """These commands take no KEY=VALUE overrides: the fix is a cache on the run's grid, not data.steps_per_beat=."""
    cache = tmp_path / "spb12"
    prepare([piece], cache, RollSettings(12), workers=1, progress=False)
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    assert main([command, str(run_dir), "--cache-dir", str(cache), *args]) == 2
    line = error_line(capsys, command)
    assert "prepared at 12 steps per beat" in line and "use a cache prepared with --steps-per-beat 4" in line
    assert "set data.steps_per_beat" not in line
    assert not (tmp_path / "out").exists()  # refused before the output folder is made


def test_train_decoder_reads_crops_on_its_encoders_grid(run_dir: Path, piece: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """A grid override came through to the decoder's crops: a decoder trained on 12 steps per beat
    over an encoder that never saw them. The encoder's grid wins, so that cache is refused."""
    cache = tmp_path / "spb12"
    prepare([piece], cache, RollSettings(12), workers=1, progress=False)
    args = ["train-decoder", "--encoder", str(run_dir / "pretrain"), "name=d", f"out_dir={tmp_path / 'runs'}",
            f"data.cache_dir={cache}", "data.steps_per_beat=12", "decoder_train.max_steps=1",
            "decoder_train.progress=false", "decoder_train.threads=1"]
    assert main(args) == 2
    line = error_line(capsys, "train-decoder")
    assert "prepared at 12 steps per beat" in line and "use a cache prepared with --steps-per-beat 4" in line
