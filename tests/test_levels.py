"""`midi-rae levels`: rate arithmetic, one row per (encoder, subset), the random twin, the
threshold's source, and reruns that reuse finished rows."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import isolated, trained_run

from midi_rae import levels
from midi_rae.checkpoint import read_metadata, save_weights
from midi_rae.cli import main
from midi_rae.models import build_encoder
from midi_rae.runs import encoder_config


@pytest.fixture(autouse=True)
def one_thread_own_rng():
    with isolated():
        yield


@pytest.fixture(scope="module")
def report(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, list[str]]:
    """The tiny Swin run (2 levels) with a 2-step decoder per row; records which split picked each threshold."""
    run = trained_run("swin", tiny_cache, tmp_path_factory)
    splits: list[str] = []
    original = levels.best_threshold
    levels.best_threshold = lambda model, loader, device: (splits.append(loader.dataset.dataset.split),
                                                           original(model, loader, device))[1]
    try:
        with isolated():
            r = levels.levels_report(run, tmp_path_factory.mktemp("levels"), steps=2, batch_size=4)
    finally:
        levels.best_threshold = original
    return r, run, splits


def test_floats_per_crop_by_hand(report) -> None:
    r, _, _ = report
    # 128 x 32 crop, 4 x 4 patches, embed_dim 8, two stages: level 1 is 32 x 8 tokens of 8, level 0 16 x 4 of 16.
    coarse, fine = 16 * 4 * 16, 32 * 8 * 8
    assert r["crop_pixels"] == 128 * 32 * 1
    assert {(row["k"], row["floats_per_crop"]) for row in r["rows"]} == {(1, coarse), (2, coarse + fine)}
    assert all(row["fraction_of_pixels"] == row["floats_per_crop"] / (128 * 32) for row in r["rows"])


def test_one_row_per_encoder_and_subset(report) -> None:
    r, _, _ = report
    assert [(row["encoder"], row["k"], row["levels"]) for row in r["rows"]] == [
        ("trained", 1, [0]), ("trained", 2, [0, 1]), ("random", 1, [0]), ("random", 2, [0, 1])]
    for row in r["rows"]:
        assert 0 <= row["val"]["pixel"]["f1"] <= 1 and row["steps"] == 2
    out = Path(r["out"])
    assert (out / "levels.md").read_text().count("| trained |") == 2 and (out / "levels.png").stat().st_size > 0
    assert not list(out.rglob(".*.tmp"))  # atomic writes leave no temporaries


def test_random_encoder_is_the_seeded_init(report) -> None:
    r, run, _ = report
    cfg = encoder_config(run / "pretrain" / "encoder.safetensors")
    rand = load_file(str(Path(r["out"]) / "random" / "encoder.safetensors"))
    trained = load_file(str(run / "pretrain" / "encoder.safetensors"))
    torch.manual_seed(cfg.train.seed)
    fresh = build_encoder(cfg).state_dict()
    assert all(torch.equal(rand[k], fresh[k]) for k in fresh)
    assert any(not torch.equal(rand[k], trained[k]) for k in fresh)


def test_spectra_count_each_levels_components_on_its_non_empty_validation_tokens(report) -> None:
    """Both encoders, every level: the components holding 90 % of the variance of the level's
    non-empty tokens over the validation crops, as `metrics.variance_components` counts them."""
    r, _, _ = report
    assert list(r["spectra"]) == ["trained", "random"]
    for levels_of in r["spectra"].values():
        assert [(s["level"], s["dim"]) for s in levels_of] == [(0, 16), (1, 8)]
        assert all(1 <= s["components_90"] <= s["dim"] and s["tokens"] > s["dim"] for s in levels_of)
    out = Path(r["out"])
    rand = levels.trained_encoder(levels.Checkpoint(encoder_config(out / "random" / "encoder.safetensors"),
                                                    levels.Weights(out / "random" / "encoder.safetensors"), None, None),
                                  encoder_config(out / "random" / "encoder.safetensors")).eval()
    cfg = encoder_config(out / "random" / "encoder.safetensors")
    _, val = levels.datasets(cfg, cfg.decoder_train.seed, False)
    x = torch.stack([val[i]["x"] for i in range(len(val))])
    with torch.inference_mode():
        lvl = rand(x).patches[1]
    tokens = lvl.emb[lvl.non_empty]
    assert r["spectra"]["random"][1] == {"level": 1, "dim": 8, "tokens": len(tokens),
                                         "components_90": levels.variance_components(tokens)[1]}
    assert "| 1 | 8 | " in (out / "levels.md").read_text()


def test_threshold_is_chosen_on_training_crops(report) -> None:
    r, _, splits = report
    assert splits == ["train"] * 4 and r["threshold_from"] == "train"
    assert all(row["threshold_from"].startswith("train") for row in r["rows"])


def test_rerun_reuses_rows_and_refuses_other_settings(report, labelled_cache: Path, monkeypatch) -> None:
    r, run, _ = report
    out = Path(r["out"])
    monkeypatch.setattr("midi_rae.levels.train_decoder", lambda *a, **k: pytest.fail("a finished row was trained again"))
    other_cache = labelled_cache
    again = levels.levels_report(run, out, steps=2, batch_size=4, subsets=[1])
    assert again["rows"] == r["rows"]  # finished rows stay in the report
    done = out / "trained" / "1" / "result.json"
    old = json.loads(done.read_text())
    done.write_text(json.dumps({k: v for k, v in old.items() if k not in ("val_by_collection", "val_selection")}))  # made before
    rescored = levels.levels_report(run, out, steps=2, batch_size=4, subsets=[1])
    assert rescored["rows"] == r["rows"] and json.loads(done.read_text()) == old  # scored again, not trained
    with pytest.raises(ValueError, match="other settings"):
        levels.levels_report(run, out, steps=3, batch_size=4, subsets=[1])
    with pytest.raises(ValueError, match="decoder_width"):  # a wider decoder is another row
        levels.levels_report(run, out, steps=2, batch_size=4, subsets=[1], decoder_width=16)
    with pytest.raises(ValueError, match="cache"):  # rows scored on another cache are not reused
        levels.levels_report(run, out, steps=2, batch_size=4, subsets=[1], cache_dir=str(other_cache))


def test_decoder_width_sets_the_rows_decoders(report, tmp_path: Path) -> None:
    _, run, _ = report
    cfg = encoder_config(run / "pretrain" / "encoder.safetensors")
    row_cfg = levels.subset_config(cfg, 1, tmp_path, 2, 4, None, None, decoder_width=16)
    assert row_cfg.decoder.embed_dim == 16 and row_cfg.decoder.skip_levels == [0]
    assert levels.subset_config(cfg, 1, tmp_path, 2, 4, None, None).decoder.embed_dim is None


def test_cli_errors(report, capsys, tmp_path: Path) -> None:
    _, run, _ = report
    assert main(["levels", str(tmp_path / "missing")]) == 2
    assert main(["levels", str(run), "--subsets", "3", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("midi-rae levels: error:") for line in err)
    assert "1..2" in err[1]


def test_scores_by_collection_score_each_collections_crops_alone(report) -> None:
    """Two collections, one decoded perfectly and one not at all: F1 1 and 0 on their own,
    in between pooled; every validation crop of the report is in one collection's count."""
    x = torch.zeros(3, 1, 128, 8)
    x[:, 0, 60, 2:6] = 1
    probs = torch.stack([x[0], x[1], torch.zeros_like(x[2])])
    pred = levels.Predictions(probs, x, torch.ones(3, 1, 128, 8, dtype=torch.bool), ["folk", "folk", "bach"])
    by = levels.scores_by_collection(pred, 0.5)
    assert by["folk"]["crops"] == 2 and by["folk"]["pixel"]["f1"] == 1.0 and by["folk"]["onset"]["f1"] == 1.0
    assert by["bach"]["crops"] == 1 and by["bach"]["pixel"]["f1"] == 0.0
    assert 0 < levels.scores(pred, 0.5)["pixel"]["f1"] < 1
    r, _, _ = report
    for row in r["rows"]:
        assert sum(c["crops"] for c in row["val_by_collection"].values()) == row["val_crops"] > 0


def test_another_runs_twin_and_a_row_interrupted_with_other_weights_are_refused(report, tmp_path: Path,
                                                                                monkeypatch) -> None:
    """An output folder shared by runs: the random twin there is checked against this run's
    (before, any file there was reused as this run's twin), and an interrupted row is resumed only
    with the settings it was started with (before, a decoder begun on other encoder weights went on)."""
    r, run, _ = report
    out = shutil.copytree(r["out"], tmp_path / "levels")
    twin = out / "random" / "encoder.safetensors"
    state = load_file(str(twin))
    save_weights({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, twin, read_metadata(twin))
    with pytest.raises(ValueError, match="not this run's random twin"):
        levels.levels_report(run, out, steps=2, batch_size=4, subsets=[1])
    again = levels.levels_report(run, out, steps=2, batch_size=4, subsets=[1], overwrite=True)
    assert all(torch.equal(load_file(str(twin))[k], state[k]) for k in state)  # this run's twin, made again
    assert [row["val"] for row in again["rows"] if row["encoder"] == "trained"] == \
        [row["val"] for row in r["rows"] if row["encoder"] == "trained"]
    row = out / "trained" / "1"
    started = json.loads((row / "settings.json").read_text())
    (row / "result.json").unlink()  # interrupted, and the run's encoder changed since
    (row / "settings.json").write_text(json.dumps({**started, "encoder_sha1": "0" * 40}))
    monkeypatch.setattr("midi_rae.levels.train_decoder", lambda *a, **k: pytest.fail("resumed on other weights"))
    with pytest.raises(ValueError, match="interrupted with other settings"):
        levels.levels_report(run, out, steps=2, batch_size=4, subsets=[1], random=False)


@pytest.mark.parametrize("width", ["0", "-8"])
def test_decoder_width_must_be_positive(report, width: str, capsys, tmp_path: Path) -> None:
    _, run, _ = report
    assert main(["levels", str(run), "--decoder-width", width, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--decoder-width must be at least 1" in err[0]
    assert not (tmp_path / "out").exists()
