"""Linear probes: a separable synthetic labelled corpus, split grouped by piece, both baselines,
and one table for a Swin and a ViT run."""
from pathlib import Path

import numpy as np
import pytest
import symusic
import torch
from tiny_runs import isolated, trained_run

from midi_rae.cli import main
from midi_rae.prepare import prepare
from midi_rae.probe import fit_logistic, grouped_split, labelled_crops, probe, scores


@pytest.fixture(autouse=True)
def one_thread_own_rng():
    with isolated():
        yield


@pytest.fixture(scope="module")
def labelled_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 'collections' (folder names): dense low chords of short notes vs a sparse high melody of long notes."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(1)
    for collection in ("chords", "melody"):
        (root / collection).mkdir()
        for i in range(16):
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


def test_logistic_regression_separates_and_scores() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40, 5, generator=g) + 3, torch.randn(40, 5, generator=g) - 3])
    y = torch.tensor([0] * 40 + [1] * 40)
    assert scores(fit_logistic(x, y, 2)(x), y) == {"accuracy": 1.0, "balanced_accuracy": 1.0}
    # Balanced accuracy is the mean per-class recall: always guessing 0 on a 3:1 set.
    assert scores(torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 0, 1])) == {"accuracy": 0.75, "balanced_accuracy": 0.5}


def test_split_is_grouped_by_piece(labelled_cache: Path) -> None:
    d = labelled_crops(labelled_cache, 32, 1)
    test = grouped_split(d.pieces, 0.25)
    assert set(d.labels) == {"chords", "melody"} and d.x.shape[1:] == (1, 128, 32)
    assert not {p for p, t in zip(d.pieces, test) if t} & {p for p, t in zip(d.pieces, test) if not t}
    assert 0 < int(test.sum()) < len(test) and len(set(d.pieces)) < len(d.pieces)  # several crops per piece


def test_probe_swin_and_vit_beat_the_majority(labelled_cache: Path, tiny_cache: Path, tmp_path_factory,
                                              tmp_path: Path, capsys) -> None:
    runs = [trained_run("swin", tiny_cache, tmp_path_factory), trained_run("vit", tiny_cache, tmp_path_factory)]
    r = probe(runs, labelled_cache)
    rows = {row["model"].split(" (")[0]: row for row in r["rows"]}
    assert r["classes"] == ["chords", "melody"] and set(rows) == {"majority class", "raw pixels", "swin", "vit"}
    assert rows["majority class"]["balanced_accuracy"] == 0.5
    for name in ("swin", "vit", "raw pixels"):
        assert rows[name]["balanced_accuracy"] > 0.8 and rows[name]["accuracy"] > rows["majority class"]["accuracy"]
    assert main(["probe", *map(str, runs), "--cache-dir", str(labelled_cache), "--level", "0",
                 "-o", str(tmp_path / "probe.json")]) == 0
    out = capsys.readouterr().out
    assert "| swin (swin), level 0 |" in out and "| vit (vit), level 0 |" in out and (tmp_path / "probe.json").exists()


def test_probe_needs_two_classes(tiny_cache: Path, tmp_path_factory) -> None:
    with pytest.raises(ValueError, match="at least 2 classes"):
        probe([trained_run("swin", tiny_cache, tmp_path_factory)], tiny_cache)


def test_picked_pieces_are_independent_of_the_split() -> None:
    from midi_rae.data import split_of
    from midi_rae.probe import pick_pieces

    members = [{"piece_id": f"music21/essenFolksong/tune{i}"} for i in range(2000)]
    picked = pick_pieces(members, 200)
    assert picked == pick_pieces(members[::-1], 200)  # stable, whatever the order
    test_share = sum(split_of(p["piece_id"], 0.25) == "val" for p in picked) / len(picked)
    assert 0.15 < test_share < 0.35  # about the requested 25%, not all of them
