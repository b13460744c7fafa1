"""Evaluation: metric functions against hand-computed cases, every figure function, and
`midi-rae eval` on tiny trained Swin and ViT runs."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import isolated, trained_run

from midi_rae.cli import main
from midi_rae.engine import evaluate_decoder
from midi_rae.evaluate import evaluate, pca_rgb, project_2d
from midi_rae.metrics import (best_f1, note_onsets, onset_confusion, onset_ratios, ratios, threshold_sweep,
                              variance_components)
from midi_rae.plots import level_pca_figure, projection_figure, spectrum_figure


@pytest.fixture(autouse=True)
def one_thread_own_rng():
    with isolated():
        yield


def test_threshold_sweep_and_best_f1() -> None:
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    probs = torch.tensor([[0.9, 0.4, 0.3, 0.1]])
    thr = torch.tensor([0.2, 0.35, 0.5])
    counts = threshold_sweep(probs, target, thr)
    # 0.2: 3 predicted (TP 2, FP 1); 0.35: TP 2 exactly; 0.5: TP 1, FN 1.
    assert counts.tolist() == [[2, 1, 0, 1], [2, 0, 0, 2], [1, 0, 1, 2]]
    assert best_f1(counts, thr) == (pytest.approx(0.35), 1)
    # A per-sample mask leaves pixels out of the count.
    where = torch.tensor([[True, False, True, True]])
    assert threshold_sweep(probs, target, thr[:1], where).tolist() == [[1, 1, 0, 1]]
    assert ratios(counts[2])["f1"] == pytest.approx(2 / 3)


def test_note_onsets_and_onset_confusion() -> None:
    frame = torch.zeros(1, 2, 8, dtype=torch.bool)
    frame[0, 0, 1:7] = True  # one long note at pitch 0 ...
    onset = torch.zeros_like(frame)
    onset[0, 0, 4] = True  # ... split into two by an onset at step 4
    frame[0, 1, 2:3] = True
    assert note_onsets(frame).nonzero().tolist() == [[0, 0, 1], [0, 1, 2]]
    assert note_onsets(frame, onset).nonzero().tolist() == [[0, 0, 1], [0, 0, 4], [0, 1, 2]]
    true = torch.stack([frame, onset], 1)  # (B, C, H, W): 3 notes
    pred = torch.zeros_like(true)
    pred[0, 0, 0, 1:7] = True  # the long note without the split: 1 TP, the note at step 4 missed
    pred[0, 0, 1, 5:6] = True  # pitch 1 at the wrong step: 1 FP, 1 FN
    counts = onset_confusion(pred, true)
    assert counts.tolist() == [[1, 1, 2]]
    r = onset_ratios(counts.sum(0))
    assert r["precision"] == pytest.approx(0.5) and r["recall"] == pytest.approx(1 / 3) and r["f1"] == pytest.approx(0.4)
    where = torch.ones(1, 1, 2, 8, dtype=torch.bool)
    where[..., 4:] = False  # only steps 0..3 count: 1 TP, 1 FN (pitch 1 at 2)
    assert onset_confusion(pred, true, where).tolist() == [[1, 0, 1]]
    assert math.isnan(onset_ratios(torch.zeros(3))["f1"])


def test_a_note_sounding_before_the_crop_is_no_onset() -> None:
    true = torch.zeros(1, 2, 2, 6, dtype=torch.bool)  # (B, C, H, W): frame and onset channels
    true[0, 0, 0, :3] = True  # pitch 0 sounds from before the crop: no onset in it
    true[0, 0, 1, :2] = True  # pitch 1 starts at column 0, as its onset channel says
    true[0, 1, 1, 0] = True
    assert onset_confusion(true, true).tolist() == [[1, 0, 0]]
    assert onset_confusion(true[:, :1], true[:, :1]).tolist() == [[0, 0, 0]]  # frame only: column 0 cannot tell
    pred = true.clone()
    pred[0, 1, 0, 0] = True  # a predicted onset where the true note only continues: a false positive
    assert onset_confusion(pred, true).tolist() == [[1, 1, 0]]


class _Fixed(torch.nn.Module):
    """A 'decoder trainer' whose logits are given."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.out = logits

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.out


def test_training_pixel_f1_is_the_eval_definition() -> None:
    x = torch.zeros(1, 2, 128, 8)  # (B, C, H, W); the piece ends after column 4
    x[0, 0, 60, :4] = 1
    x[0, 1, 60, 0] = 1
    logits = torch.full_like(x, -9.0)
    logits[0, 0, 60, :4] = 9.0  # the frame channel inside the piece is right ...
    logits[0, 0, 61, 4:] = 9.0  # ... notes in the padding past the end are not scored ...
    logits[0, 1, 70, :] = 9.0  # ... nor is the onset channel
    batch = {"x": x, "start": torch.tensor([0]), "steps": torch.tensor([4])}
    m = evaluate_decoder(_Fixed(logits), [batch], torch.device("cpu"), 0.5)
    assert m["f1"] == 1.0 and m["precision"] == 1.0 and m["specificity"] == 1.0


def test_variance_components() -> None:
    g = torch.Generator().manual_seed(0)
    basis = torch.eye(6)[:2] * torch.tensor([[10.0], [1.0]])  # variance 100 : 1 along two axes
    x = torch.randn(500, 2, generator=g) @ basis
    s, k = variance_components(x)
    assert s.shape == (6,) and k == 1 and s[2:].abs().max() < 1e-4
    s, k = variance_components(x, 0.999)
    assert k == 2


def test_every_figure_writes_a_png(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    roll = (torch.rand(128, 64, generator=g) > 0.97).float().numpy()
    fit = torch.randn(200, 8, generator=g)
    maps = [pca_rgb(fit, fit[:32], (8, 4)), pca_rgb(fit[:, :2], fit[:1, :2], (1, 1))]  # also < 3 components
    assert maps[0].shape == (8, 4, 3) and 0 <= maps[0].min() and maps[0].max() <= 1
    paths = [level_pca_figure(roll, maps, [(16, 16), (128, 64)], ["level 0", "level 1"], tmp_path / "pca.png"),
             spectrum_figure([np.array([3.0, 1.0, 0.1]), np.array([1.0, 1.0])], [2, 2], ["a", "b"], tmp_path / "s.png"),
             projection_figure(project_2d(fit)[0], ["x"] * 100 + ["y"] * 100, tmp_path / "p.png")]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


@pytest.mark.parametrize("kind", ["swin", "vit"])
def test_eval_on_a_trained_run(kind: str, tiny_cache: Path, tmp_path_factory, tmp_path: Path) -> None:
    run = trained_run(kind, tiny_cache, tmp_path_factory)
    r = evaluate(run, tmp_path, threshold=0.5, n_examples=2)
    assert r["samples"] > 0 and r["stated"]["threshold"] == 0.5 and 0.05 <= r["best_f1"]["threshold"] <= 0.95
    f1 = lambda s: s["pixel"]["f1"] or 0.0  # noqa: E731
    assert f1(r["stated"]) >= 0 and r["best_f1_chosen_on"].endswith("training crops")
    assert set(r["stated"]["pixel"]) == {"precision", "recall", "specificity", "f1"} and "f1" in r["stated"]["onset"]
    assert len(r["spectra"]) == 2 and all(1 <= v["components_90"] <= v["dim"] for v in r["spectra"].values())
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["best_f1"] == r["best_f1"] and "| pixel F1 |" in (tmp_path / "metrics.md").read_text()
    for name in ("recon", "levels_pca", "spectra", "global"):
        assert (tmp_path / f"{name}.png").stat().st_size > 5000
    # on training crops the best-F1 threshold would be scored on the crops it was chosen on: not reported
    on_train = evaluate(run, tmp_path / "train", threshold=0.5, split="train", n_examples=2)
    assert "best_f1" not in on_train and "best_f1_chosen_on" not in on_train and on_train["stated"]["threshold"] == 0.5
    assert "best F1" not in (tmp_path / "train" / "metrics.md").read_text()


def test_eval_cli_default_folder(tiny_cache: Path, tmp_path_factory, capsys) -> None:
    run = trained_run("swin", tiny_cache, tmp_path_factory)
    assert main(["eval", str(run), "--max-items", "4", "--examples", "1"]) == 0
    assert (run / "eval" / "metrics.md").exists() and "best F1 on 4 training crops" in capsys.readouterr().out
