"""Time grids other than 4 steps per beat, end to end (prepare -> train -> reconstruct), and
repeats played as written out (issue 13, item 5)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import symusic

from midi_rae.cache import default_cache_dir, load_index, load_settings, prepare
from midi_rae.config import load_config
from midi_rae.encode import Embeddings
from midi_rae.roll import RollSettings, read_pieces, roll_to_midi
from midi_rae.runs import datasets
from midi_rae.stages import pretrain, train_decoder
from tests.tiny_runs import isolated

TPQ = 480
TRIPLET = TPQ // 3  # an eighth-note triplet: 160 ticks, 4 steps at 12 per beat, 4 / 3 steps at 4 per beat


def triplet_score(beats: int = 24, seed: int = 0) -> symusic.Score:
    """Eighth-note triplets over a quarter-note bass: three notes to the beat in the melody."""
    rng = np.random.default_rng(seed)
    score, track = symusic.Score(TPQ), symusic.Track("t", 0, False)
    for beat in range(beats):
        track.notes.append(symusic.Note(beat * TPQ, TPQ, int(rng.integers(40, 52)), 90))
        for k in range(3):
            track.notes.append(symusic.Note(beat * TPQ + k * TRIPLET, TRIPLET, int(rng.integers(64, 80)), 90))
    track.notes.sort()
    score.tracks.append(track)
    return score


def onsets_in_quarters(path: Path) -> list[tuple[float, float, int]]:
    """(start, duration, pitch) of every note of a MIDI file, in quarter notes, sorted."""
    score = symusic.Score(str(path))
    tpq = score.ticks_per_quarter
    return sorted((n.time / tpq, n.duration / tpq, n.pitch) for t in score.tracks for n in t.notes)


def test_triplets_survive_a_round_trip_at_12_steps_per_beat(tmp_path: Path) -> None:
    src = tmp_path / "triplets.mid"
    triplet_score(8).dump_midi(str(src))
    want = onsets_in_quarters(src)
    for spb, survives in ((12, True), (4, False)):
        (piece,), _ = read_pieces(src, RollSettings(spb))
        out = tmp_path / f"back{spb}.mid"
        roll_to_midi(piece.roll, out, spb)
        got = onsets_in_quarters(out)
        assert (got == pytest.approx(want) if len(got) == len(want) else False) is survives, spb
    # at 12 per beat every triplet starts on the grid: steps 0, 4, 8, 12, ...
    (piece,), _ = read_pieces(src, RollSettings(12))
    melody = piece.notes[piece.notes["pitch"] >= 64]
    assert melody["start"].tolist() == list(range(0, 8 * 12, 4))


def test_key_and_default_folder_follow_the_settings(tmp_path: Path) -> None:
    base, grid12, as_written = RollSettings(), RollSettings(12), RollSettings(expand_repeats=False)
    # MIDI has nothing to expand: caches made before the setting existed keep their keys
    assert base.key_json(".mid") == as_written.key_json(".mid") != grid12.key_json(".mid")
    assert base.key_json(".mxl") != as_written.key_json(".mxl")
    assert base.key_json(".abc") != as_written.key_json(".abc")
    assert default_cache_dir(None, None, base).name == "corpus"
    assert default_cache_dir(None, ["bach"], grid12).name == "corpus-bach@spb12"
    assert default_cache_dir(None, None, RollSettings(6, expand_repeats=False)).name == "corpus@spb6-as-written"


def repeat_score():
    """Three 4/4 bars of quarter notes, the first two under a repeat sign: 20 notes played."""
    from music21 import bar, meter, note, stream

    s, p = stream.Score(), stream.Part()
    for i, pitches in enumerate([["C4", "D4", "E4", "F4"], ["G4", "A4", "B4", "C5"], ["C5", "B4", "A4", "G4"]]):
        m = stream.Measure(number=i + 1)
        if i == 0:
            m.insert(0, meter.TimeSignature("4/4"))
        for q in pitches:
            m.append(note.Note(q, quarterLength=1))
        p.append(m)
    p.getElementsByClass(stream.Measure)[1].rightBarline = bar.Repeat(direction="end")
    s.insert(0, p)
    return s


def test_musicxml_repeats_are_played_as_written(tmp_path: Path) -> None:
    path = Path(repeat_score().write("musicxml", fp=tmp_path / "rep.musicxml"))
    (played,), _ = read_pieces(path, RollSettings())
    (notated,), _ = read_pieces(path, RollSettings(expand_repeats=False))
    assert (len(played.notes), len(notated.notes)) == (20, 12)
    assert played.meta["repeats"] == "expanded" and "repeats" not in notated.meta
    assert (played.steps, notated.steps) == (20 * 4, 12 * 4)
    # the second time through starts where the first ended: C4 again at beat 8
    assert played.notes["start"][8] == 8 * 4 and played.notes["pitch"][8] == 60


ABC = """X:1
T:Repeated
M:4/4
L:1/4
K:C
|: C D E F :| G A B c |]
"""


def test_abc_repeats_follow_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "rep.abc"
    path.write_text(ABC)
    (played,), _ = read_pieces(path, RollSettings())
    (notated,), _ = read_pieces(path, RollSettings(expand_repeats=False))
    assert (len(played.notes), len(notated.notes)) == (12, 8)


def test_prepare_cli_flags(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    triplet_score(8).dump_midi(str(src / "t.mid"))
    repeat_score().write("musicxml", fp=src / "rep.musicxml")
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "midi_rae", "prepare", str(src), "--cache-dir", str(cache), "--workers", "1", "--quiet"]
    subprocess.run(cmd + ["--steps-per-beat", "12", "--no-expand-repeats"], check=True, capture_output=True)
    assert load_settings(cache) == RollSettings(12, expand_repeats=False)
    assert {p["source"].split("/")[-1]: p["notes"] for p in load_index(cache)} == {"t.mid": 32, "rep.musicxml": 12}
    bad = subprocess.run(cmd + ["--steps-per-beat", "0"], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "1..96" in bad.stderr


def test_twelve_steps_per_beat_end_to_end(tmp_path: Path, tiny_cache: Path) -> None:
    """prepare at 12 per beat -> train and decode at 12 -> reconstruct reads a file at 12 and
    writes MIDI on that grid; a run at another grid refuses the cache in one line, and so does
    `encode` asked for the pieces of a cache at 4."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        triplet_score(24 + 2 * i, seed=i).dump_midi(str(src / f"t{i:02d}.mid"))
    cache = tmp_path / "cache"
    prepare([src], cache, RollSettings(12), workers=1, progress=False)
    flags = [f"data.cache_dir={cache}", f"out_dir={tmp_path / 'runs'}", "name=grid12", "data.crop_width=96",
             "data.val_fraction=0.25", "data.val_max_items=4", "model.embed_dim=8", "model.depths=[1,1]",
             "model.num_heads=[1,2]", "model.window_size=4", "model.mae_decoder_dim=16", "model.mae_decoder_heads=2",
             "train.batch_size=4", "train.max_steps=2", "train.warmup_steps=1", "train.progress=false",
             "train.tensorboard=false", "train.threads=1", "decoder_train.batch_size=4", "decoder_train.max_steps=2",
             "decoder_train.warmup_steps=1", "decoder_train.progress=false", "decoder_train.tensorboard=false",
             "decoder_train.threads=1"]
    with pytest.raises(ValueError, match=r"prepared at 12 steps per beat.*set data.steps_per_beat=12"):
        datasets(load_config(None, flags), 0, pair=False)
    cfg = load_config(None, flags + ["data.steps_per_beat=12"])
    with isolated():
        pretrain(cfg)
        train_decoder(cfg)
    run = tmp_path / "runs" / "grid12"
    out = tmp_path / "rec.mid"
    res = subprocess.run([sys.executable, "-m", "midi_rae", "reconstruct", str(run), str(src / "t00.mid"), "-o", str(out),
                          "--threshold", "0"], capture_output=True, text=True, check=True)
    assert "288 steps" in res.stdout  # 24 beats at 12 per beat
    score = symusic.Score(str(out))
    assert score.ticks_per_quarter % 12 == 0
    ends = [n.end for t in score.tracks for n in t.notes]
    assert max(ends) == 24 * score.ticks_per_quarter  # threshold 0: every pixel on, the roll lasts 24 beats
    # encode reads the file on the run's grid too
    subprocess.run([sys.executable, "-m", "midi_rae", "encode", str(run), str(src / "t00.mid"), "-o",
                    str(tmp_path / "e.safetensors")], capture_output=True, text=True, check=True)
    e = Embeddings.load(tmp_path / "e.safetensors")
    assert (e.steps, e.meta["steps_per_beat"]) == (288, 12)
    bad = subprocess.run([sys.executable, "-m", "midi_rae", "encode", str(run), "*", "--cache-dir", str(tiny_cache), "-o",
                          str(tmp_path / "e4")], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1
    assert "prepared at 4 steps per beat, the encoder reads 12" in bad.stderr
