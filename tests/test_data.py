"""MIDI <-> roll, ABC and music21 reading, crops, the split and the dataset."""
import shutil
from pathlib import Path

import music21
import numpy as np
import pytest
import symusic
import torch

from midi_rae.cache import CacheReader, load_settings, prepare, split_hash, split_of, work_groups, work_key
from midi_rae.cache import crop, load_index, load_roll
from midi_rae.config import ConfigError, load_config
from midi_rae.corpus import corpus_root
from midi_rae.dataset import PianoRollDataset
from midi_rae.roll import BadInput, RollSettings, abc_tune_to_score, midi_to_roll, roll_to_midi, split_abc

WHEEL_MIDI = sorted(Path(music21.__file__).parent.rglob("*.mid"))


def write_midi(path: Path, notes: list[tuple[int, int, int]], tpq: int = 480, drums: bool = False) -> Path:
    """notes: (start_tick, duration_ticks, pitch)."""
    score = symusic.Score(tpq)
    track = symusic.Track("t", 0, drums)
    for start, dur, pitch in notes:
        track.notes.append(symusic.Note(start, dur, pitch, 90))
    score.tracks.append(track)
    score.dump_midi(str(path))
    return path


@pytest.mark.parametrize("path", WHEEL_MIDI, ids=lambda p: p.name)
def test_round_trip_wheel_midi(path: Path, tmp_path: Path) -> None:
    roll = midi_to_roll(path)
    assert roll.dtype == np.uint8 and roll.ndim == 3 and roll.shape[:2] == (2, 128)
    assert roll.any() and set(np.unique(roll)) <= {0, 1}
    roll_to_midi(roll, tmp_path / "rt.mid")
    np.testing.assert_array_equal(midi_to_roll(tmp_path / "rt.mid"), roll)


def test_repeated_notes_stay_separate(tmp_path: Path) -> None:
    # Two quarter notes C4 back to back, then a half note: one sounding run, two onsets.
    path = write_midi(tmp_path / "rep.mid", [(0, 480, 60), (480, 480, 60), (960, 960, 64)])
    roll = midi_to_roll(path)  # (2, 128, 16) at 4 steps per beat
    assert roll.shape == (2, 128, 16)
    np.testing.assert_array_equal(roll[0, 60], [1] * 8 + [0] * 8)
    np.testing.assert_array_equal(np.flatnonzero(roll[1, 60]), [0, 4])
    np.testing.assert_array_equal(np.flatnonzero(roll[1, 64]), [8])
    roll_to_midi(roll, tmp_path / "rt.mid")
    notes = symusic.Score(str(tmp_path / "rt.mid")).tracks[0].notes
    assert [(n.pitch, n.time, n.duration) for n in notes] == [(60, 0, 480), (60, 480, 480), (64, 960, 960)]


def test_settings_resolution_velocity_frame_only(tmp_path: Path) -> None:
    path = write_midi(tmp_path / "a.mid", [(0, 240, 60), (240, 240, 62), (20, 10, 70)])
    assert midi_to_roll(path, RollSettings(steps_per_beat=8)).shape == (2, 128, 8)
    assert midi_to_roll(path, RollSettings(onset=False)).shape == (1, 128, 4)
    vel = midi_to_roll(path, RollSettings(velocity=True))
    assert vel.max() == 90
    assert midi_to_roll(path)[0, 70].sum() == 1  # a note shorter than a step keeps one step
    roll_to_midi(vel, tmp_path / "v.mid")
    np.testing.assert_array_equal(midi_to_roll(tmp_path / "v.mid", RollSettings(velocity=True)), vel)


def test_drums_excluded_by_default(tmp_path: Path) -> None:
    score = symusic.Score(480)
    for drums, pitch in ((False, 60), (True, 36)):
        track = symusic.Track("t", 0, drums)
        track.notes.append(symusic.Note(0, 480, pitch, 90))
        score.tracks.append(track)
    score.dump_midi(str(tmp_path / "mix.mid"))
    assert midi_to_roll(tmp_path / "mix.mid")[0, :, 0].nonzero()[0].tolist() == [60]
    assert midi_to_roll(tmp_path / "mix.mid", RollSettings(drums=True))[0, :, 0].nonzero()[0].tolist() == [36, 60]
    with pytest.raises(BadInput, match="drum tracks only"):
        midi_to_roll(write_midi(tmp_path / "d.mid", [(0, 480, 36)], drums=True))


def test_abc_split_and_metadata() -> None:
    text = "% book\nL:1/8\n\nX:1\nT:One\nM:3/4\nK:G\nGAB|\n\nX:2\nT:Two\nK:Dm\nDEF|\n"
    tunes = split_abc(text)
    assert len(tunes) == 2 and all(t.startswith("L:1/8\nX:") for t in tunes)
    score = abc_tune_to_score(tunes[0])
    assert [n.pitch for n in score.tracks[0].notes] == [67, 69, 71]


def test_abc_badly_formed_repeats() -> None:
    with pytest.raises(BadInput, match=r"badly formed repeats \(abc2midi: .*variant ending"):
        abc_tune_to_score("X:1\nT:bad\nM:4/4\nL:1/4\nK:C\n|1 ABc :|2 d e |1 f g |]\n")


def test_crop_zero_fill_no_wrap() -> None:
    roll = np.zeros((2, 128, 10), np.uint8)
    roll[0, 127, 0] = roll[0, 0, 9] = 1
    out = crop(roll, -2, 4, pitch_shift=0)
    assert out.shape == (2, 128, 4) and out[0, 127].tolist() == [0, 0, 1, 0]
    assert not crop(roll, 0, 4, pitch_shift=1)[0, 0].any()  # 127 moved out, nothing wrapped to 0
    assert crop(roll, 8, 4, pitch_shift=-1)[0, :, 1].sum() == 0  # pitch 0 moved out below
    assert crop(roll, 8, 4, pitch_shift=2)[0, 2].tolist() == [0, 1, 0, 0]


def test_split_stable() -> None:
    ids = [f"music21/essenFolksong/han1.abc#{i}" for i in range(2000)]
    splits = [split_of(i) for i in ids]
    assert splits == [split_of(i) for i in reversed(ids)][::-1]
    assert 0.03 < splits.count("val") / len(ids) < 0.07
    # Fixed values: the split must not change between versions or machines.
    assert split_of("music21/bach/bwv66.6.mxl") == "train"
    assert [i for i in range(200) if split_of(f"p{i}") == "val"] == VAL_IDS


def test_split_keeps_encodings_of_one_work_together() -> None:
    # A work stored twice (e.g. a Bach chorale as kern and as MusicXML) must not sit on both sides.
    for i in range(400):
        assert split_of(f"music21/bach/bwv{i}.krn") == split_of(f"music21/bach/bwv{i}.mxl") == split_of(f"music21/bach/BWV{i}.xml")
        assert split_of(f"tunes/t{i}.abc#3") == split_of(f"tunes/t{i}.krn#3")
    assert {split_of(f"music21/bach/bwv{i}.krn") for i in range(400)} == {"train", "val"}


def test_work_key_joins_sections_variants_and_movements() -> None:
    # Sections of one mass movement, variants of one chorale, movements in their work's folder.
    assert work_key("music21/palestrina/Credo_03_a.krn") == work_key("music21/palestrina/Credo_03_d.krn") == "music21/palestrina/credo_03"
    assert work_key("music21/bach/bwv18.5-lz.mxl") == work_key("music21/bach/bwv18.5-w.mxl") == "music21/bach/bwv18.5"
    assert work_key("music21/beethoven/opus18no1/movement4.krn") == work_key("music21/beethoven/opus18no1/movement1.mxl")
    # ... but not tunes of one ABC book, numbered files, or different works that share a prefix.
    assert work_key("music21/essenFolksong/han1.abc#3") != work_key("music21/essenFolksong/han1.abc#4")
    assert work_key("music21/oneills1850/0732-0758_bs.abc#0") != work_key("music21/oneills1850/0732-0758_mh.abc#0")
    assert len({work_key(f"songs/{i:04d}.mid") for i in range(100)}) == 100
    assert work_key("music21/monteverdi/madrigal.3.1.mxl") != work_key("music21/monteverdi/madrigal.3.2.mxl")
    assert work_key("music21/palestrina/Credo_03_a.krn") != work_key("music21/palestrina/Credo_04_a.krn")
    for piece_id in ("music21/palestrina/Credo_03_a.krn", "music21/bach/bwv18.5-lz.mxl", "a/opus1/movement2.mid", "t.abc#5"):
        assert work_key(work_key(piece_id)) == work_key(piece_id)  # a work key names its own work


def test_work_groups_join_what_a_stated_parent_work_links() -> None:
    groups = work_groups([("music21/palestrina/Kyrie_65.krn", "Missa Ut re mi fa sol la"),
                          ("music21/palestrina/Agnus_I_11.krn", "Missa  Ut re mi fa sol la"),
                          ("music21/palestrina/Gloria_03.krn", "Missa Alma Redemptoris mater"),
                          ("music21/bach/bwv277.krn", "Four-part Chorales"), ("music21/bach/bwv277.mxl", None)])
    work = lambda piece_id: groups.get(work_key(piece_id), work_key(piece_id))  # noqa: E731
    assert work("music21/palestrina/Kyrie_65.krn") == work("music21/palestrina/Agnus_I_11.krn")
    assert work("music21/palestrina/Kyrie_65.krn") != work("music21/palestrina/Gloria_03.krn")
    # the kern chorale names its collection as parent; its MusicXML twin (no parent) stays with it
    assert work("music21/bach/bwv277.krn") == work("music21/bach/bwv277.mxl")
    assert work("music21/bach/bwv66.6.mxl") == work_key("music21/bach/bwv66.6.mxl")


def test_prepare_puts_the_sections_of_one_mass_on_one_side(tmp_path: Path) -> None:
    """Kern files of one mass (the file states it: !!!OPR) get one `work` and one split value,
    though their names share nothing; a file of another mass gets its own."""
    corpus = corpus_root() / "palestrina"
    for name in ("Gloria_03.krn", "Credo_03_a.krn", "Agnus_03.krn"):  # the first two: Missa Alma Redemptoris mater
        shutil.copy(corpus / name, tmp_path / name)
    prepare([tmp_path], tmp_path / "cache", workers=1, progress=False)
    work = {p["piece_id"].rpartition("/")[2]: p["work"] for p in load_index(tmp_path / "cache")}
    assert work["Gloria_03.krn"] == work["Credo_03_a.krn"] != work["Agnus_03.krn"]
    split = {bytes(r["piece_id"]).decode().rpartition("/")[2]: r["split"] for r in CacheReader(tmp_path / "cache").index}
    assert split["Gloria_03.krn"] == split["Credo_03_a.krn"] == split_hash(work["Gloria_03.krn"])


VAL_IDS = [8, 18, 22, 35, 47, 61, 115, 117, 171, 174, 180, 186]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(40):  # 40 synthetic pieces, 8 to 64 beats of random chords
        notes = [(int(b) * 480, 480 * int(rng.integers(1, 4)), int(p))
                 for b in range(int(rng.integers(8, 64))) for p in rng.integers(40, 90, 3)]
        write_midi(root / f"p{i:02d}.mid", notes)
    cache = root / "cache"
    prepare([root], cache, workers=1, progress=False)
    return cache


def test_dataset_pairs(cache: Path) -> None:
    ds = PianoRollDataset(cache, "train", crop_width=32, max_time_shift=4, max_pitch_shift=3, val_fraction=0.2)
    item = ds[0]
    assert item["x"].shape == item["x2"].shape == (2, 128, 32) and item["x"].dtype == torch.float32
    assert 0 <= item["x"].min() and item["x"].max() <= 1
    for i in range(len(ds)):
        it = ds[i]
        roll = load_roll(cache, next(p for p in load_index(cache) if p["piece_id"] == it["piece_id"]))
        for key, shift in (("x", "shift1"), ("x2", "shift2")):
            dt, dp = it[shift].tolist()
            assert abs(dt) <= 4 and abs(dp) <= 3
            np.testing.assert_array_equal(it[key].numpy(), crop(roll, it["start"] + dt, 32, dp))
    # Near-empty anchors are avoided where the piece has music.
    assert np.mean([ds[i]["x"][0].any(dim=0).float().mean().item() for i in range(len(ds))]) > 0.5


def test_dataset_determinism_and_split(cache: Path) -> None:
    train = PianoRollDataset(cache, "train", crop_width=32, val_fraction=0.2)
    val = PianoRollDataset(cache, "val", crop_width=32, val_fraction=0.2)
    ids = lambda ds: {ds.piece_id(i) for i in range(ds.num_pieces)}
    assert not ids(train) & ids(val) and len(ids(train)) + len(ids(val)) == 40
    assert all(split_of(i, 0.2) == "val" for i in ids(val)) and all(split_of(i, 0.2) == "train" for i in ids(train))
    again = PianoRollDataset(cache, "val", crop_width=32, val_fraction=0.2)
    again.set_epoch(5)
    for i in range(len(val)):
        assert torch.equal(val[i]["x"], again[i]["x"]) and torch.equal(val[i]["x2"], again[i]["x2"])
    a = [train[i]["start"] for i in range(len(train))]
    assert a == [train[i]["start"] for i in range(len(train))]
    train.set_epoch(1)
    assert a != [train[i]["start"] for i in range(len(train))]


def test_dataset_options(cache: Path) -> None:
    single = PianoRollDataset(cache, "all", crop_width=64, pair=False, channels=1)
    item = single[3]
    assert set(item) == {"x", "piece", "piece_id", "start", "steps"} and item["x"].shape == (1, 128, 64)
    transposed = PianoRollDataset(cache, "all", crop_width=64, pair=False, transpose=6)
    plain = PianoRollDataset(cache, "all", crop_width=64, pair=False)
    assert any(not torch.equal(transposed[i]["x"], plain[i]["x"]) for i in range(10))
    assert all(torch.equal(transposed[i]["x"].sum(), plain[i]["x"].sum()) for i in range(10))  # pitches 40..92 stay in range
    with pytest.raises(ValueError, match="split"):
        PianoRollDataset(cache, "test")


def test_crops_on_the_tile_grid(cache: Path) -> None:
    """crop_starts='tiles': every crop starts at a multiple of the crop width inside its piece (the
    windows `encode` and the probes read), and every tile of a long piece is drawn; 'any' starts
    elsewhere too; anything else is an error."""
    tiles = PianoRollDataset(cache, "all", crop_width=32, pair=False, crop_starts="tiles", min_active=0)
    starts = [(tiles[i]["start"], tiles[i]["steps"]) for i in range(len(tiles))]
    assert all(s % 32 == 0 and s < max(steps, 1) for s, steps in starts)
    assert len({s for s, _ in starts}) > 2
    anywhere = PianoRollDataset(cache, "all", crop_width=32, pair=False)
    assert any(anywhere[i]["start"] % 32 for i in range(len(anywhere)))
    with pytest.raises(ValueError, match="crop_starts must be 'any' or 'tiles', got 'bars'"):
        PianoRollDataset(cache, "all", crop_starts="bars")
    with pytest.raises(ConfigError, match="data.crop_starts must be 'any' or 'tiles', got 'bars'"):
        load_config(None, ["data.crop_starts=bars"])


def test_hostile_length_refused(tmp_path: Path) -> None:
    # One note 15 days in: a roll of millions of columns would exhaust memory; refuse instead.
    path = write_midi(tmp_path / "far.mid", [(2**27, 96, 60)], tpq=96)
    with pytest.raises(BadInput, match=r"too long: 5592409 steps at 4 per beat \(limit 200000\)"):
        midi_to_roll(path)


def test_missing_cache_says_what_to_do(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="run `midi-rae prepare`"):
        load_settings(tmp_path)
