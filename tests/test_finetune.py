"""Fine-tuning with a classification head (`midi-rae finetune`): the head and its pooled level, the
probe suite's piece-grouped split, layer decay and label smoothing reaching the optimizer and the
loss, a tiny end-to-end run (and its scratch baseline), the error lines, and resume after SIGKILL."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_runs import isolated, kill_after_first_checkpoint, trained_run

from midi_rae import stages
from midi_rae.checkpoint import latest_checkpoint
from midi_rae.cli import main
from midi_rae.config import with_overrides
from midi_rae.engine import param_groups
from midi_rae.models import Classifier
from midi_rae.probes import probe
from midi_rae.runs import resolve_checkpoint
from midi_rae.swin import SwinEncoder

REPO = Path(__file__).resolve().parent.parent
# The labelled cache has 24 pieces per class: a class needs 5 training and 2 test pieces here.
SMALL = ["finetune.min_pieces=5", "finetune.test_fraction=0.3", "finetune.val_fraction=0.25",
         "finetune_train.batch_size=4", "finetune_train.warmup_steps=2", "finetune_train.log_every=1",
         "finetune_train.progress=false", "finetune_train.tensorboard=false", "finetune_train.threads=1"]


@pytest.fixture(autouse=True)
def one_thread_own_rng():
    with isolated():
        yield


def tiny_encoder() -> SwinEncoder:
    return SwinEncoder(img_height=32, img_width=32, embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=4)


def test_head_pools_the_chosen_level() -> None:
    torch.manual_seed(0)
    x = (torch.rand(3, 1, 32, 32) > 0.8).float()
    for level, dim in ((0, 16), (1, 8)):  # level 0 is the coarsest, the last stage's output
        for pool in ("mean", "non-empty"):
            model = Classifier(tiny_encoder(), 5, level=level, pool=pool).eval()
            assert model.head.weight.shape == (5, dim) and model.norm.normalized_shape == (dim,)
            lvl = model.encoder(x).patches[level]
            expected = model.head(model.norm(lvl.pooled(non_empty_only=pool == "non-empty")))
            assert model.logits(x).shape == (3, 5) and torch.allclose(model.logits(x), expected)
    with pytest.raises(ValueError, match=r"level 2 is out of range: the encoder has 2 levels, 0 \(coarsest\) to 1"):
        Classifier(tiny_encoder(), 5, level=2)


def test_head_on_all_levels_normalises_each_level_on_its_own() -> None:
    torch.manual_seed(0)
    x = (torch.rand(3, 1, 32, 32) > 0.8).float()
    model = Classifier(tiny_encoder(), 5, level=None).eval()
    assert model.head.weight.shape == (5, 16 + 8) and [n.normalized_shape for n in model.norm] == [(16,), (8,)]
    with torch.no_grad():  # levels of different scales: a shared LayerNorm would not give these
        model.norm[0].weight.mul_(2.0)
        model.norm[1].bias.add_(0.5)
    patches = model.encoder(x).patches
    expected = torch.cat([model.norm[0](patches[0].pooled(False)), model.norm[1](patches[1].pooled(False))], dim=-1)
    assert torch.allclose(model.features(x), expected) and torch.allclose(model.logits(x), model.head(expected))
    # one level keeps the state-dict keys of earlier versions' classifiers
    assert {"norm.weight", "norm.bias"} <= set(Classifier(tiny_encoder(), 5, level=0).state_dict())


def test_label_smoothing_enters_the_loss() -> None:
    torch.manual_seed(0)
    batch = {"x": (torch.rand(4, 1, 32, 32) > 0.8).float(), "y": torch.tensor([0, 1, 2, 1])}
    model = Classifier(tiny_encoder(), 3, label_smoothing=0.3).eval()
    loss, parts = model(batch)
    logits = model.logits(batch["x"])
    assert torch.allclose(loss, F.cross_entropy(logits, batch["y"], label_smoothing=0.3))
    assert not torch.allclose(loss, F.cross_entropy(logits, batch["y"])) and parts == {"ce": loss}


def test_classes_weigh_alike_however_long_their_pieces(labelled_cache: Path) -> None:
    """balance: each class's crops weigh the inverse of its share, so a class of long pieces (more
    crops per epoch) does not set the head's prior; the weights reach the loss."""
    from midi_rae.cache import load_index
    from midi_rae.dataset import PianoRollDataset

    pieces = load_index(labelled_cache)
    labels = {p["piece_id"]: int(p["collection"] == "melody") for p in pieces}
    ds = PianoRollDataset(labelled_cache, "all", crop_width=32, pair=False, pieces=pieces, labels=labels)
    items = ds.items_per_piece()
    assert items.sum() == len(ds) and (items >= 1).all()
    w = stages.class_weights(ds, 3)  # a third class without crops weighs 0
    crops = [items[ds.labels == c].sum() for c in (0, 1)]
    assert crops[0] != crops[1]  # the two collections' pieces differ in length
    assert w[2] == 0 and torch.allclose(w[:2] * torch.tensor(crops, dtype=torch.float32), torch.full((2,), len(ds) / 3))
    torch.manual_seed(0)
    batch = {"x": (torch.rand(4, 1, 32, 32) > 0.8).float(), "y": torch.tensor([0, 1, 1, 1])}
    model = Classifier(tiny_encoder(), 3, class_weight=w).eval()
    loss, _ = model(batch)
    assert torch.allclose(loss, F.cross_entropy(model.logits(batch["x"]), batch["y"], weight=w))
    assert "class_weight" not in model.state_dict()  # recomputed from the data, not stored with the weights


def test_head_starts_as_the_linear_probe() -> None:
    """head_init=probe: the head is the probe's classifier of the model's own features (pooled, LayerNorm)."""
    torch.manual_seed(0)
    low, high = torch.zeros(12, 1, 32, 32), torch.zeros(12, 1, 32, 32)
    low[:, :, 2:8, ::2], high[:, :, 24:30, ::4] = 1.0, 1.0  # dense low notes against sparse high ones
    x = (torch.cat([low, high]) * (torch.rand(24, 1, 32, 32) > 0.3)).float()
    crops = [{"x": x[i], "y": int(i >= 12), "piece_id": f"p{i // 2}"} for i in range(24)]
    model = Classifier(tiny_encoder(), 2)
    before = model.norm.weight.clone()
    fit = stages.probe_head(model, crops, 2, torch.device("cpu"), batch_size=5)
    assert model.training and torch.equal(model.norm.weight, before)
    pred = model.eval().logits(x).argmax(1)
    assert fit["balanced_accuracy"] == 1.0 and pred.tolist() == [0] * 12 + [1] * 12


def test_batch_norm_head_starts_as_the_same_probe() -> None:
    """finetune.batch_norm: the probe's standardisation becomes the BatchNorm's running statistics
    and the head reads standardised features; in eval the logits are the plain head's."""
    torch.manual_seed(0)
    x = (torch.rand(24, 1, 32, 32) > 0.7).float()
    crops = [{"x": x[i], "y": i % 3, "piece_id": f"p{i // 2}"} for i in range(24)]
    encoder = tiny_encoder()
    plain, normed = Classifier(encoder, 3), Classifier(encoder, 3, batch_norm=True)
    for model in (plain, normed):
        stages.probe_head(model, crops, 3, torch.device("cpu"), batch_size=5)
    feats = plain.eval().features(x)
    assert torch.allclose(normed.bn.running_mean, feats.mean(0), atol=1e-6)
    assert torch.allclose(normed.eval().logits(x), plain.logits(x), rtol=1e-4, atol=1e-4)
    # the head's weights are of the standardised features' scale, not of 1 / their spread
    assert normed.head.weight.abs().max() < plain.head.weight.abs().max()


def test_split_is_grouped_by_piece_and_is_the_probes(labelled_cache: Path, tiny_cache: Path, tmp_path_factory) -> None:
    run = resolve_checkpoint(trained_run("swin", tiny_cache, tmp_path_factory))
    cfg = with_overrides(run.config, [f"data.cache_dir={labelled_cache}", *SMALL])
    task, train, val = stages.finetune_split(cfg, labelled_cache)
    ids = [{p["piece_id"] for p in side} for side in (train, val, task.test)]
    assert all(ids) and not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
    assert ids[0] | ids[1] == {p["piece_id"] for p in task.train}
    # The probe suite holds out the same test pieces and scores the same crops.
    r = probe([run.encoder.path], labelled_cache, tasks=["collection"], test_fraction=0.3, min_pieces=5, l2=1.0,
              random_baseline=False)
    assert r["tasks"][0]["test_pieces"] == len(ids[2])
    assert r["tasks"][0]["test_crops"] == len(stages.fixed_crops(labelled_cache, task.test, {i: 0 for i in ids[2]}, cfg))


def test_layer_decay_and_label_smoothing_reach_the_training(labelled_cache: Path, tiny_cache: Path, tmp_path_factory,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = resolve_checkpoint(trained_run("swin", tiny_cache, tmp_path_factory))
    cfg = with_overrides(run.config, [f"data.cache_dir={labelled_cache}", *SMALL, "finetune_train.max_steps=2",
                                      "finetune_train.layer_decay=0.5", "finetune.label_smoothing=0.3"])
    built = []
    monkeypatch.setattr(stages, "Classifier", lambda *a, **kw: built.append(Classifier(*a, **kw)) or built[-1])
    stages.finetune(cfg, tmp_path / "ft", run)
    (model,) = built
    assert model.label_smoothing == 0.3
    saved = torch.load(latest_checkpoint(tmp_path / "ft" / "checkpoints") / "state.pt", weights_only=True)
    got = sorted((g["lr_scale"], len(g["params"])) for g in saved["optimizer"]["param_groups"])
    want = sorted((g["lr_scale"], len(g["params"])) for g in param_groups(model, 0.05, None, 0.5))
    assert got == want
    # Two blocks and the final norm: the patch embedding at 0.5**3, the head and final norm at the full rate.
    assert {s for s, _ in got} == {1.0, 0.5, 0.25, 0.125}


def test_start_crops_train_on_the_probes_crops(labelled_cache: Path, tiny_cache: Path, tmp_path_factory,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """finetune.train_crops=start: the training set is the fixed crops of the training pieces, the
    ones the probe fits its head on, with their labels and class weights."""
    run = resolve_checkpoint(trained_run("swin", tiny_cache, tmp_path_factory))
    cfg = with_overrides(run.config, [f"data.cache_dir={labelled_cache}", *SMALL, "finetune_train.max_steps=2",
                                      "finetune.train_crops=start"])
    seen, trainer = [], stages.Trainer
    monkeypatch.setattr(stages, "Trainer", lambda *a, **kw: seen.append(a[5]) or trainer(*a, **kw))  # a[5]: train_ds
    stages.finetune(cfg, tmp_path / "ft", run)
    (ds,) = seen
    _, train, _ = stages.finetune_split(cfg, labelled_cache)
    labels = {p["piece_id"]: int(p["collection"] == "melody") for p in train}
    want = stages.fixed_crops(labelled_cache, train, labels, cfg)
    assert isinstance(ds, stages.StartCrops) and len(ds) == len(want)
    assert all(torch.equal(ds[i]["x"], c["x"]) for i, c in enumerate(want))
    counts = np.bincount(ds.labels, minlength=2)
    assert torch.allclose(stages.class_weights(ds, 2), torch.tensor(len(ds) / (2 * counts), dtype=torch.float32))


def test_finetune_end_to_end_and_scratch(labelled_cache: Path, tiny_cache: Path, tmp_path_factory, capsys) -> None:
    run = trained_run("swin", tiny_cache, tmp_path_factory)
    common = ["--cache-dir", str(labelled_cache), *SMALL, "finetune_train.max_steps=6", "finetune_train.eval_every=3"]
    assert main(["finetune", str(run), "--label", "collection", "--level", "1", *common]) == 0
    out = capsys.readouterr().out
    stage = run / "finetune-collection"
    assert "| **test (final weights)** |" in out and "[finetune] 6 steps" not in out
    for name in ("summary.json", "summary.md", "confusion.png", "classifier.safetensors", "encoder.safetensors",
                 "metrics.jsonl", "config.yaml"):
        assert (stage / name).stat().st_size > 0, name
    r = json.loads((stage / "summary.json").read_text())
    assert r["classes"] == ["chords", "melody"] and r["level"] == 1 and not r["scratch"]
    assert sum(map(sum, r["test"]["confusion"])) == r["test_crops"] and 0 <= r["test"]["balanced_accuracy"] <= 1
    assert r["final"]["step"] == 6 and r["final"]["best_step"] in (3, 6)
    assert set(load_file(str(stage / "classifier.safetensors"))) >= {"head.weight", "head.bias", "norm.weight"}
    # The fine-tuned encoder is a run-like encoder: the probe suite and `encode` read it.
    assert resolve_checkpoint(stage).config.finetune.level == 1
    # The baseline: the run's architecture from its random initialisation, in a folder of its own;
    # here with the head on all levels, each with its own LayerNorm.
    assert main(["finetune", str(run), "--scratch", "--level", "all", *common]) == 0
    assert "Head on all levels" in capsys.readouterr().out
    scratch = load_file(str(run / "finetune-collection-scratch" / "classifier.safetensors"))
    r = json.loads((run / "finetune-collection-scratch" / "summary.json").read_text())
    assert r["scratch"] and r["level"] is None and {"norm.0.weight", "norm.1.weight"} <= set(scratch)
    assert not torch.equal(scratch["encoder.patch_embed.proj.weight"],
                           load_file(str(stage / "classifier.safetensors"))["encoder.patch_embed.proj.weight"])


@pytest.mark.parametrize("args, message", [
    (["--label", "nope"], "no piece of .* has a 'nope' label; use --label with one of: collection"),
    (["--level", "2"], r"finetune.level=2 \(--level\) is out of range: this encoder has 2 levels, 0 \(coarsest\) to 1"),
    (["--level", "top"], r"--level takes a level number \(0 = coarsest\) or 'all', got 'top'"),
])
def test_errors_are_one_line(args: list[str], message: str, labelled_cache: Path, tiny_cache: Path, tmp_path_factory,
                             tmp_path: Path, capsys) -> None:
    run = trained_run("swin", tiny_cache, tmp_path_factory)
    args = [str(tiny_cache) if a == "TINY" else a for a in args]
    cache = [] if "--cache-dir" in args else ["--cache-dir", str(labelled_cache)]
    assert main(["finetune", str(run), *cache, *args, *SMALL, "-o", str(tmp_path / "ft")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("midi-rae finetune: error: ")
    assert __import__("re").search(message, err[0]), err[0]
    assert not (tmp_path / "ft" / "checkpoints").exists()


def test_test_pieces_the_encoder_pretrained_on_are_refused(tiny_cache: Path, tmp_path_factory, tmp_path: Path,
                                                           capsys) -> None:
    """On the run's own cache, a test fraction above its data.val_fraction (0.2) would score it on
    pieces it pretrained on: refused, as the probe suite refuses it; at 0.2 the run's own cache passes
    (and then has one class)."""
    run = trained_run("swin", tiny_cache, tmp_path_factory)
    base = ["finetune", str(run), "--label", "collection", "--cache-dir", str(tiny_cache), *SMALL, "-o", str(tmp_path / "ft")]
    for extra, message in (([], "the test fraction 0.3 .* is above the data.val_fraction 0.2 that swin pretrained with"),
                           (["finetune.test_fraction=0.2"], r"--label collection has 1 class\(es\) .* a classifier needs two")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and __import__("re").search(message, err[0]), err
    assert not (tmp_path / "ft" / "checkpoints").exists()


def _cmd(run: Path, cache: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "midi_rae", "finetune", str(run), "--cache-dir", str(cache), "-o", str(out), *SMALL,
            "finetune_train.max_steps=12", "finetune_train.ckpt_every=3", "finetune_train.eval_every=4",
            "model.drop_path_rate=0.1"]


def test_resume_after_sigkill_is_exact(labelled_cache: Path, tiny_cache: Path, tmp_path_factory, tmp_path: Path) -> None:
    run = trained_run("swin", tiny_cache, tmp_path_factory)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    subprocess.run(_cmd(run, labelled_cache, tmp_path / "a"), check=True, env=env, capture_output=True, cwd=REPO)
    killed_at = kill_after_first_checkpoint(_cmd(run, labelled_cache, tmp_path / "b"),
                                            tmp_path / "b" / "checkpoints" / "latest.json")
    assert killed_at < 12 and not (tmp_path / "b" / "summary.json").exists()
    resumed = subprocess.run([*_cmd(run, labelled_cache, tmp_path / "b"), "--resume"], env=env, capture_output=True,
                             cwd=REPO, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = (load_file(str(tmp_path / s / "classifier.safetensors")) for s in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / s / "summary.json").read_text()) for s in "ab")
    assert ra["test"] == rb["test"]
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["split"] == "train"]
    assert steps == list(range(1, 13))
