"""The probe suite: a separable synthetic labelled corpus, split grouped by piece, every baseline
(majority, pixels, descriptors, random encoder), and one table for a Swin and a ViT run."""
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import isolated, trained_run

from midi_rae.cache import load_index
from midi_rae.checkpoint import read_metadata, save_weights
from midi_rae.cli import main
from midi_rae.models import build_encoder
from midi_rae.core import PatchState, grid_positions
from midi_rae.labels import find_tasks, piece_crops
from midi_rae.metrics import scores
from midi_rae.probes import L2_GRID, fit_logistic, level_features, probe, probe_task, time_self_similarity
from midi_rae.runs import initial_encoder
from midi_rae.runs import load_encoder
from midi_rae.swin import SwinEncoder


@pytest.fixture(autouse=True)
def one_thread_own_rng():
    with isolated():
        yield


def test_logistic_regression_separates_and_scores() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40, 5, generator=g) + 3, torch.randn(40, 5, generator=g) - 3])
    y = torch.tensor([0] * 40 + [1] * 40)
    assert scores(fit_logistic(x, y, 2)(x), y) == {"accuracy": 1.0, "balanced_accuracy": 1.0}
    # Balanced accuracy is the mean per-class recall: always guessing 0 on a 3:1 set.
    assert scores(torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 0, 1])) == {"accuracy": 0.75, "balanced_accuracy": 0.5}


def test_time_self_similarity_finds_the_period() -> None:
    """Columns that repeat every 3 steps: similarity 1 at lags 3 and 6, below 1 elsewhere; silent
    columns (here every token of column 1 empty) leave the pairs they are part of out."""
    rows, cols, D = 2, 12, 8
    pattern = torch.randn(3, D)
    emb = pattern[torch.arange(cols) % 3].expand(rows, cols, D).reshape(1, rows * cols, D)  # (1, N, D)
    non_empty = torch.ones(1, rows * cols, dtype=torch.bool)
    lvl = PatchState(emb, grid_positions(rows, cols), non_empty, non_empty.clone())
    sim = time_self_similarity(lvl)
    assert sim.shape == (1, cols // 2)
    assert torch.allclose(sim[0, [2, 5]], torch.ones(2)) and (sim[0, [0, 1, 3, 4]] < 0.99).all()
    silent = non_empty.reshape(rows, cols).clone()
    silent[:, 1] = False
    emb2 = emb.clone().reshape(rows, cols, D)
    emb2[:, 1] = torch.randn(D)  # what a silent column holds must not matter
    lvl2 = PatchState(emb2.reshape(1, rows * cols, D), grid_positions(rows, cols), silent.reshape(1, -1), non_empty)
    assert torch.allclose(time_self_similarity(lvl2)[0, [2, 5]], torch.ones(2))
    assert time_self_similarity(PatchState(emb[:, :6], grid_positions(2, 3), non_empty[:, :6], non_empty[:, :6])) is None


def test_level_features_read_the_time_stage_beside_the_levels() -> None:
    """An encoder with a time stage adds the mean of its tokens, alone and appended to the
    suite's widest set; one without adds nothing."""
    torch.manual_seed(0)
    kw = dict(img_height=128, img_width=64, embed_dim=8, depths=(1, 1, 1), num_heads=(1, 2, 4), drop_path_rate=0.0)
    enc = SwinEncoder(time_stage_dim=16, time_stage_depth=1, time_stage_heads=2, **kw).eval()
    x = (torch.rand(3, 1, 128, 64) < 0.05).float()
    feats = level_features(enc, x)
    with torch.no_grad():
        time = enc(x).time.emb.mean(1)  # (3, 16)
    torch.testing.assert_close(feats["time stage"], time)
    widest = feats["all non-empty + self-sim + time stage"]
    torch.testing.assert_close(widest, torch.cat([feats["all non-empty + self-sim"], time], 1))
    assert not any("time" in k for k in level_features(SwinEncoder(**kw).eval(), x))


def test_split_is_grouped_by_piece(labelled_cache: Path) -> None:
    tasks = find_tasks(load_index(labelled_cache), 0.3, min_train_pieces=5, min_test_pieces=2)
    # The file names (chords00.mid, melody00.mid) are one source set per collection: no second task.
    assert [t.name for t in tasks] == ["collection"] and tasks[0].classes == ["chords", "melody"]
    train, test = {p["piece_id"] for p in tasks[0].train}, {p["piece_id"] for p in tasks[0].test}
    assert train and test and not train & test


def test_random_init_baseline_is_untrained(tiny_cache: Path, tmp_path_factory) -> None:
    trained, cfg = load_encoder(trained_run("swin", tiny_cache, tmp_path_factory))
    twin, again = initial_encoder(cfg), initial_encoder(cfg)
    t, r, a = trained.state_dict(), twin.state_dict(), again.state_dict()
    assert t.keys() == r.keys() and not twin.training
    assert any(not torch.equal(t[k], r[k]) for k in t if t[k].is_floating_point())
    assert all(torch.equal(r[k], a[k]) for k in r)  # a seeded fresh init, the same every time
    torch.manual_seed(cfg.train.seed)  # the weights pretraining started from
    fresh = build_encoder(cfg).state_dict()
    assert all(torch.equal(r[k], fresh[k]) for k in r)


def test_the_twin_has_the_pretraining_seed_when_the_decoder_was_trained_apart(tiny_cache: Path, tmp_path: Path) -> None:
    """`train-decoder` run later without the pretraining's train.seed writes its own config (seed
    0) beside the decoder; the twin is still the encoder pretraining started from (seed 1)."""
    from midi_rae.config import load_config
    from midi_rae.probes import load_models
    from midi_rae.stages import pretrain, train_decoder

    base = ["name=s1", f"data.cache_dir={tiny_cache}", f"out_dir={tmp_path}", "data.crop_width=32", "model.embed_dim=8",
            "model.depths=[1,1]", "model.num_heads=[1,2]", "model.window_size=4", "model.mae_decoder_dim=16",
            "model.mae_decoder_heads=2", "train.batch_size=4", "train.max_steps=1", "train.warmup_steps=1",
            "train.progress=false", "train.tensorboard=false", "decoder_train.batch_size=4", "decoder_train.max_steps=1",
            "decoder_train.warmup_steps=1", "decoder_train.progress=false", "decoder_train.tensorboard=false"]
    seeded = load_config(None, [*base, "train.seed=1"])
    pretrain(seeded)
    train_decoder(load_config(None, base))
    _, twin = load_models([tmp_path / "s1"])
    want, other = initial_encoder(seeded).state_dict(), initial_encoder(load_config(None, base)).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in twin.encoder.state_dict().items())
    assert not all(torch.equal(v, other[k]) for k, v in twin.encoder.state_dict().items())


def test_probe_suite_swin_and_vit(labelled_cache: Path, tiny_cache: Path, tmp_path_factory,
                                  tmp_path: Path, capsys) -> None:
    runs = [trained_run("swin", tiny_cache, tmp_path_factory), trained_run("vit", tiny_cache, tmp_path_factory)]
    r = probe(runs, labelled_cache, tasks=["collection"], test_fraction=0.3, min_pieces=5)
    (task,) = r["tasks"]
    assert task["task"] == "collection" and task["classes"] == ["chords", "melody"]
    assert r["models"] == ["swin (swin)", "swin (swin) at random init", "vit (vit)", "vit (vit) at random init"]
    rows = task["rows"]
    by = {(row["model"], row["features"]): row for row in rows}
    assert by[("majority class", "always 'chords'")]["balanced_accuracy"] == 0.5
    assert by[("descriptors", "hand-crafted")]["balanced_accuracy"] > 0.9
    assert by[("raw pixels", "4x4 avg-pooled")]["balanced_accuracy"] > 0.8
    swin = {row["features"] for row in rows if row["model"] == "swin (swin)"}
    assert swin == {"L0 mean", "L0 non-empty", "L1 mean", "L1 non-empty", "all mean", "all non-empty",
                    "all non-empty + self-sim"}
    for model in r["models"]:  # one headline per encoder, chosen on the training side
        assert sum(bool(row.get("headline")) for row in rows if row["model"] == model) == 1
    assert all(row["l2"] in (1e-3, 1e-2, 1e-1, 1.0, 10.0) for row in rows if "l2" in row)
    assert all(0 <= row["ci95"][0] <= row["ci95"][1] <= 1 for row in rows)
    assert [(d["model"], d["against"]) for d in task["differences"]] == [
        (m, other) for m in ("swin (swin)", "vit (vit)") for other in (m + " at random init", "raw pixels", "descriptors")]
    assert main(["probe", *map(str, runs), "--cache-dir", str(labelled_cache), "--level", "0", "--test-fraction", "0.3",
                 "--label", "collection", "--min-pieces", "5", "--no-random", "-o", str(tmp_path / "new" / "probe.json")]) == 0
    out = capsys.readouterr().out
    assert "| swin (swin) | L0 mean" in out and "| vit (vit) | L0 non-empty" in out and "random init" not in out
    assert "| collection | swin (swin) | descriptors | " in out and "| collection | vit (vit) | raw pixels | " in out
    assert all((tmp_path / "new" / f"probe.{ext}").stat().st_size > 0 for ext in ("json", "md", "png"))  # folder made
    assert main(["probe", str(runs[0]), "-o", str(tmp_path)]) == 2  # a folder, refused before any probing
    assert "is a folder; give a file name" in capsys.readouterr().err


def test_probe_needs_two_classes(tiny_cache: Path, tmp_path_factory, capsys) -> None:
    run = trained_run("swin", tiny_cache, tmp_path_factory)
    with pytest.raises(ValueError, match="no task .* has two classes"):
        probe([run], tiny_cache)
    assert main(["probe", str(run), "--cache-dir", str(tiny_cache)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("midi-rae probe: error: no task")


def test_picked_pieces_are_independent_of_the_split() -> None:
    from midi_rae.cache import split_of
    from midi_rae.labels import pick_pieces

    members = [{"piece_id": f"music21/essenFolksong/tune{i}"} for i in range(2000)]
    picked = pick_pieces(members, 200)
    assert picked == pick_pieces(members[::-1], 200)  # stable, whatever the order
    test_share = sum(split_of(p["piece_id"], 0.25) == "val" for p in picked) / len(picked)
    assert 0.15 < test_share < 0.35  # about the requested 25%, not all of them


def test_classes_count_works_not_files() -> None:
    """A work stored as .krn and .mxl is one work: a class that has enough pieces only because its
    works come in two formats is left out."""
    from midi_rae.cache import split_of

    def works(name: str, n: int, suffixes: tuple[str, ...]) -> list[dict]:
        return [{"piece_id": f"music21/{name}/w{i}.{s}", "collection": name} for i in range(n) for s in suffixes]

    index = works("single", 60, ("krn",)) + works("double", 60, ("krn", "mxl")) + works("twice", 24, ("krn", "mxl"))
    train_works = sum(split_of(f"music21/twice/w{i}.krn", 0.5) == "train" for i in range(24))
    test_works = 24 - train_works
    assert 2 * train_works > train_works + 1 and test_works >= 2
    tasks = find_tasks(index, 0.5, ["collection"], min_train_pieces=train_works + 1, min_test_pieces=2)
    assert tasks[0].classes == ["double", "single"]
    tasks = find_tasks(index, 0.5, ["collection"], min_train_pieces=train_works, min_test_pieces=2)
    assert tasks[0].classes == ["double", "single", "twice"]


def test_source_sets_are_those_of_one_collection() -> None:
    """A collection whose every tune comes from one source set ('book' of airdsAirs) would make
    the source-set task part collection: the task keeps the sets of one collection."""
    index = [{"piece_id": f"music21/{c}/{s}{f}.abc#{i}", "collection": c, "source": f"{s}{f}.abc"}
             for c, sets in (("essenFolksong", ("han", "erk", "lux")), ("airdsAirs", ("book",)))
             for s in sets for f in range(3) for i in range(40)]
    tasks = find_tasks(index, 0.2, ["source_set"], min_train_pieces=5, min_test_pieces=2)
    assert tasks[0].classes == ["essenFolksong/erk", "essenFolksong/han", "essenFolksong/lux"]


def test_test_side_never_holds_a_runs_training_pieces(tiny_cache: Path, tmp_path_factory) -> None:
    """The test side is the works hashed under --test-fraction; above a run's data.val_fraction
    some of them were that run's training pieces."""
    run = trained_run("swin", tiny_cache, tmp_path_factory)
    with pytest.raises(ValueError, match=r"--test-fraction 0.5 is above the data.val_fraction of"):
        probe([run], tiny_cache, test_fraction=0.5)


def test_one_l2_still_picks_the_headline_on_the_hold_out() -> None:
    """`probe --l2 X` (a grid of one penalty) still scores each feature set on the hold-out of the
    training works, so the headline is the informative set, not the first one listed."""
    from midi_rae.labels import Crops, Task
    from midi_rae.probes import probe_task

    g = torch.Generator().manual_seed(0)
    pieces = [{"piece_id": f"w{i}.mid", "collection": "ab"[i % 2]} for i in range(80)]
    y = torch.tensor([i % 2 for i in range(80)], dtype=torch.float64)
    crops = Crops(torch.zeros(80, 1, 1, 1), [p["piece_id"] for p in pieces], {p["piece_id"]: [i] for i, p in enumerate(pieces)})
    noise = torch.randn(80, 4, generator=g, dtype=torch.float64)
    signal = torch.cat([y[:, None] + 0.1 * torch.randn(80, 1, generator=g, dtype=torch.float64), noise[:, 1:]], 1)
    task = Task("collection", ["a", "b"], pieces[:60], pieces[60:])
    result = probe_task(task, crops, {"enc": {"noise": noise, "signal": signal}}, l2_grid=(1e-2,))
    rows = {r["features"]: r for r in result["rows"] if r["model"] == "enc"}
    assert all(r["holdout_bacc"] == r["holdout_bacc"] for r in rows.values())  # scored, not NaN
    assert rows["signal"].get("headline") and not rows["noise"].get("headline")


def test_bootstrap_resamples_groups_and_pairs_predictors() -> None:
    from midi_rae.metrics import bootstrap_balanced_accuracy, scores

    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 0, 1, 1, 2, 2, 0])
    correct = torch.stack([pred == y, pred == y, torch.ones(8, dtype=torch.bool)])  # (3, 8)
    boot = bootstrap_balanced_accuracy(correct, y, [f"w{i}" for i in range(8)], 4000)  # (4000, 3)
    assert boot.shape == (4000, 3)
    assert torch.equal(boot[:, 0], boot[:, 1])  # the same predictions on the same resamples: paired
    assert (boot[:, 2] == 1).all() and boot[:, 0].std() > 0.05
    assert abs(float(boot[:, 0].mean()) - scores(pred, y)["balanced_accuracy"]) < 0.05
    assert torch.equal(boot, bootstrap_balanced_accuracy(correct, y, [f"w{i}" for i in range(8)], 4000))  # seeded
    # one work holding every crop: each resample draws the whole test side, so no spread at all
    whole = bootstrap_balanced_accuracy(correct, y, ["w"] * 8, 100)
    assert torch.allclose(whole[:, 0], torch.tensor(scores(pred, y)["balanced_accuracy"], dtype=torch.float64))


def test_differences_are_paired_against_the_twin_and_the_baselines() -> None:
    """An encoder whose features are its twin's differs from it by exactly zero on every resample;
    one with the label in its features is ahead of the twin with an interval above zero."""
    from midi_rae.labels import Crops, Task
    from midi_rae.probes import probe_task

    g = torch.Generator().manual_seed(0)
    pieces = [{"piece_id": f"w{i}.mid", "collection": "ab"[i % 2]} for i in range(120)]
    y = torch.tensor([i % 2 for i in range(120)], dtype=torch.float64)
    crops = Crops(torch.zeros(120, 1, 1, 1), [p["piece_id"] for p in pieces], {p["piece_id"]: [i] for i, p in enumerate(pieces)})
    noise = {"f": torch.randn(120, 4, generator=g, dtype=torch.float64)}
    signal = {"f": y[:, None] + 0.1 * torch.randn(120, 1, generator=g, dtype=torch.float64)}
    task = Task("collection", ["a", "b"], pieces[:80], pieces[80:])
    sets = {"descriptors": noise, "same": noise, "same at random init": noise, "good": signal, "good at random init": noise}
    diffs = {(d["model"], d["against"]): d for d in probe_task(task, crops, sets, l2_grid=(1e-2,))["differences"]}
    assert set(diffs) == {("same", "same at random init"), ("same", "descriptors"),
                          ("good", "good at random init"), ("good", "descriptors")}  # no raw-pixel row given
    assert diffs[("same", "same at random init")]["difference"] == 0 and diffs[("same", "same at random init")]["ci95"] == [0, 0]
    good = diffs[("good", "good at random init")]
    assert good["difference"] > 0.3 and good["ci95"][0] > 0.1


def test_runs_of_one_config_name_keep_their_own_rows(labelled_cache: Path, tiny_cache: Path, tmp_path_factory,
                                                     tmp_path: Path, capsys) -> None:
    """Two seeds of a preset in other folders share the config name: their rows are told apart by
    path (before, the second run's features replaced the first's under the one name)."""
    run = trained_run("swin", tiny_cache, tmp_path_factory)
    other = tmp_path / "elsewhere" / run.name  # its pretraining stage alone: a decoder names its own encoder
    shutil.copytree(run / "pretrain", other / "pretrain")
    enc = other / "pretrain" / "encoder.safetensors"
    save_weights({k: torch.zeros_like(v) for k, v in load_file(enc).items()}, enc, read_metadata(enc))
    r = probe([run, other], labelled_cache, tasks=["collection"], test_fraction=0.3, min_pieces=5, random_baseline=False)
    assert r["models"] == [f"{run} (swin)", f"{other} (swin)"]
    rows = r["tasks"][0]["rows"]
    zeroed = [row["balanced_accuracy"] for row in rows if row["model"] == f"{other} (swin)"]
    assert zeroed == [0.5] * len(zeroed)  # constant features: chance, and only its own rows say so
    assert any(row["balanced_accuracy"] > 0.5 for row in rows if row["model"] == f"{run} (swin)")
    with pytest.raises(ValueError, match="given twice"):
        probe([run, run], labelled_cache, tasks=["collection"], test_fraction=0.3, min_pieces=5)


@pytest.mark.parametrize("args, message", [(["-o", "OUT/probe.md"], "give a .json name"),
                                           (["-o", "OUT/probe.png"], "give a .json name"),
                                           (["--l2", "inf"], "positive and finite")])
def test_probe_refuses_outputs_that_overwrite_each_other_and_an_infinite_penalty(
        args, message, tiny_cache: Path, tmp_path_factory, tmp_path: Path, capsys) -> None:
    run = trained_run("swin", tiny_cache, tmp_path_factory)
    args = [a.replace("OUT", str(tmp_path)) for a in args]
    assert main(["probe", str(run), "--cache-dir", str(tiny_cache), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_a_task_side_without_crops_is_named(labelled_cache: Path) -> None:
    (task,) = find_tasks(load_index(labelled_cache), 0.3, min_train_pieces=5, min_test_pieces=2)
    crops = piece_crops(labelled_cache, task.train, 32, 2)  # the test pieces give no crop
    with pytest.raises(ValueError, match="task 'collection': no test piece has a crop"):
        probe_task(task, crops, {}, L2_GRID)
