"""Training: a few steps of every objective on a tiny config, checkpoints, strict loading,
decoder training, the run report, and resume-after-SIGKILL equivalence."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import kill_after_first_checkpoint
from torch import nn

from midi_rae import stages, trainer
from midi_rae.checkpoint import latest_checkpoint, load_checkpoint, load_weights
from midi_rae.config import ConfigError, TrainConfig, load_config, resolve_config_path
from midi_rae.distributed import Dist
from midi_rae.evaluate import run_summary
from midi_rae.engine import (NonFiniteLoss, evaluate_decoder, evaluate_pretrain, layer_decay_scales, lr_at, momentum_at,
                             param_groups, train_one_epoch)
from midi_rae.metrics import MaskedPatchMeter, PixelMeter, confusion, inside_piece
from midi_rae.logger import Logger
from midi_rae.models import DecoderTrainer, Pretrainer, align_levels, build_decoder, build_encoder
from midi_rae.runs import datasets
from midi_rae.stages import pretrain, train_decoder
from midi_rae.swin import SwinEncoder
from midi_rae.trainer import config_diff, val_loader
from midi_rae.vit import ViTEncoder

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine makes two threads far slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(cache: Path, out: Path, *extra: str) -> list[str]:
    """Overrides for a model small enough that a step takes a few milliseconds."""
    return [f"data.cache_dir={cache}", f"out_dir={out}", "data.crop_width=32", "data.val_fraction=0.2",
            "data.val_max_items=8", "data.max_time_shift=4", "data.max_pitch_shift=3",
            "model.embed_dim=8", "model.depths=[1,1]", "model.num_heads=[1,2]", "model.window_size=4",
            "model.mae_decoder_dim=16", "model.mae_decoder_heads=2", "objective.predictor_dim=16",
            "objective.predictor_heads=2", "objective.sigreg_projections=16",
            "train.batch_size=4", "train.max_steps=3", "train.warmup_steps=1", "train.log_every=1",
            "train.ckpt_every=2", "train.progress=false", "train.tensorboard=false",
            "decoder_train.batch_size=4", "decoder_train.max_steps=2", "decoder_train.warmup_steps=1",
            "decoder_train.log_every=1", "decoder_train.progress=false", "decoder_train.tensorboard=false", *extra]


def lines(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()]


OBJECTIVES = {
    "simmim": [],
    "mep": ["objective.recon_weight=0", "objective.mep_weight=1"],
    "lejepa_anchor": ["objective.recon_weight=0", "objective.mask_ratio=0", "objective.lejepa_weight=1", "objective.anchor_weight=0.1"],
    "multiscale": ["objective.multiscale_weight=1", "objective.recon_visible_weight=0.1", "objective.pos_weight=3"],
    "all": ["objective.mep_weight=0.5", "objective.lejepa_weight=0.5", "objective.anchor_weight=0.1", "objective.multiscale_weight=0.5",
            "model.grad_checkpointing=true"],
    "vit": ["model.encoder=vit", "model.patch_h=8", "model.patch_w=8", "model.embed_dim=16", "model.num_heads=2",
            "model.depth=1", "objective.mep_weight=0.5"],
}


@pytest.mark.parametrize("name", OBJECTIVES)
def test_objective_trains(name: str, tiny_cache: Path, tmp_path: Path) -> None:
    cfg = load_config(None, tiny(tiny_cache, tmp_path, f"name={name}", *OBJECTIVES[name]))
    before = {k: v.clone() for k, v in Pretrainer(cfg).state_dict().items()}
    final = pretrain(cfg)
    stage = tmp_path / name / "pretrain"
    log = lines(stage / "metrics.jsonl")
    train = [l for l in log if l["split"] == "train"]
    assert [l["step"] for l in train] == [1, 2, 3] and all(torch.isfinite(torch.tensor(l["loss"])) for l in train)
    assert final["step"] == 3 and log[-1]["split"] == "final" and any(l["split"] == "val" for l in log)
    assert (stage / "config.yaml").exists() and latest_checkpoint(stage / "checkpoints").name == "step_00000003"
    enc = load_file(str(stage / "encoder.safetensors"))
    assert any(not torch.equal(enc[k], before["encoder." + k]) for k in enc)  # it trained
    if cfg.objective.recon_weight > 0:
        val = next(l for l in log if l["split"] == "val")
        assert {"masked_precision", "masked_recall", "masked_f1"} <= set(val)


def test_decoder_and_report(tiny_cache: Path, tmp_path: Path) -> None:
    cfg = load_config(None, tiny(tiny_cache, tmp_path, "name=rep"))
    pretrain(cfg)
    final = train_decoder(cfg)
    assert final["step"] == 2 and {"val_precision", "val_recall", "val_specificity", "val_f1"} <= set(final)
    summary = run_summary(cfg, n_examples=2)
    run = tmp_path / "rep"
    assert (run / "recon.png").stat().st_size > 1000 and (run / "summary.md").exists()
    assert summary["decoder"]["threshold"] == 0.5 and "masked_f1" in summary["pretrain"]
    md = (run / "summary.md").read_text()
    assert "| pretrain (validation objective) | loss |" in md  # a total loss, not a masked-patch score
    assert "| pretrain (masked patches, per-sample mean, p > 0.5) | masked_f1 |" in md
    # The frozen encoder is untouched by decoder training.
    ckpt = load_file(str(latest_checkpoint(run / "decoder" / "checkpoints") / "model.safetensors"))
    enc = load_file(str(run / "pretrain" / "encoder.safetensors"))
    assert all(torch.equal(ckpt["encoder." + k], v) for k, v in enc.items())


def test_checkpoint_contents_and_strict_loading(tiny_cache: Path, tmp_path: Path) -> None:
    cfg = load_config(None, tiny(tiny_cache, tmp_path, "name=ck", "train.max_steps=5", "train.keep_last=1",
                                 "train.layer_decay=0.8"))
    pretrain(cfg)
    ckpts = tmp_path / "ck" / "pretrain" / "checkpoints"
    kept = sorted(p.name for p in ckpts.glob("step_*"))
    best = json.loads((ckpts / "best.json").read_text())["dir"]
    assert kept == sorted({"step_00000005", best}) and not list(ckpts.glob(".*"))
    state = torch.load(latest_checkpoint(ckpts) / "state.pt", weights_only=True)  # no pickled code
    assert state["step"] == 5 and state["config"]["model"]["embed_dim"] == 8 and "torch" in state["rng"][0]
    # layer decay over 2 blocks: patch embedding 0.8**3, blocks 0.8**2 and 0.8, final norm and heads 1
    assert sorted({round(g["lr_scale"], 9) for g in state["optimizer"]["param_groups"]}) == [0.512, 0.64, 0.8, 1.0]
    bigger = Pretrainer(load_config(None, tiny(tiny_cache, tmp_path, "model.embed_dim=16")))
    with pytest.raises(ValueError, match=r"shape mismatch .*encoder.mask_token: checkpoint \(8,\) vs model \(16,\)"):
        load_checkpoint(latest_checkpoint(ckpts), bigger)
    other = build_encoder(load_config(None, tiny(tiny_cache, tmp_path, "model.depths=[1,1,1]", "model.num_heads=[1,2,4]")))
    with pytest.raises(ValueError, match=r"missing in checkpoint \(\d+\): .*stages.2"):
        load_weights(other, tmp_path / "ck" / "pretrain" / "encoder.safetensors")
    with pytest.raises(Exception, match="already holds checkpoints: pass --resume"):
        pretrain(cfg)


@pytest.mark.parametrize("stage, section", [("pretrain", "train"), ("decoder", "decoder_train")])
def test_missing_wandb_names_the_config_field(stage: str, section: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    cfg = load_config(None, [f"{section}.wandb=true", f"{section}.tensorboard=false"])
    with pytest.raises(ConfigError, match=rf"^{section}\.wandb is true but wandb is not installed.*set {section}\.wandb=false"):
        Logger(tmp_path, cfg, stage, section, True, 0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_validation_leaves_the_training_stream_alone(device: str, tiny_cache: Path, tmp_path: Path) -> None:
    # Objectives that draw on the device during validation: masks, drop paths, SIGReg directions.
    cfg = load_config(None, tiny(tiny_cache, tmp_path, "objective.mep_weight=0.5", "objective.lejepa_weight=0.2",
                                 "model.drop_path_rate=0.1"))
    dev = torch.device(device)
    model = Pretrainer(cfg).to(dev)
    _, val = datasets(cfg, 0, model.needs_views)

    def stream(validate: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        torch.manual_seed(1)
        torch.rand(3, device=dev)  # training has drawn some already
        stats = evaluate_pretrain(model, val_loader(val, 4, 0), dev, seed=0) if validate else {}
        return torch.rand(8), torch.rand(8, device=dev).cpu(), stats

    cpu_a, dev_a, stats_a = stream(True)
    cpu_b, dev_b, _ = stream(False)
    _, _, stats_c = stream(True)
    assert torch.equal(cpu_a, cpu_b) and torch.equal(dev_a, dev_b)
    assert stats_a == stats_c  # and every validation sees the same draws


def test_validation_crops_cover_every_collection(labelled_cache: Path, tmp_path: Path) -> None:
    """A cap on the validation crops keeps them spread over the validation pieces: items come in
    piece-id order, so the first crops alone would all be of the first collection."""
    full = load_config(None, [f"data.cache_dir={labelled_cache}", f"out_dir={tmp_path}", "data.crop_width=128",
                              "data.val_fraction=0.3", "data.val_max_items=null"])
    _, every = datasets(full, 0, False)
    collection = lambda item: item["piece_id"].split("/")[0]  # noqa: E731
    assert {collection(every[i]) for i in range(len(every))} == {"chords", "melody"}
    capped = load_config(None, [f"data.cache_dir={labelled_cache}", f"out_dir={tmp_path}", "data.crop_width=128",
                                "data.val_fraction=0.3", "data.val_max_items=4"])
    _, val = datasets(capped, 0, False)
    assert len(val) == 4 and {collection(val[i]) for i in range(4)} == {"chords", "melody"}
    assert val.indices[0] == 0 and val.indices[-1] == len(every) - 1


def test_validation_builds_no_graph(tiny_cache: Path, tmp_path: Path) -> None:
    """Both validations run without autograd (a graph per batch would only cost memory)."""
    cfg = load_config(None, tiny(tiny_cache, tmp_path))
    model = Pretrainer(cfg)
    _, val = datasets(cfg, 0, model.needs_views)
    seen = []
    model.encoder.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    evaluate_pretrain(model, val_loader(val, 4, 0), torch.device("cpu"), seed=0)
    decoder = DecoderTrainer(model.encoder, build_decoder(cfg))
    evaluate_decoder(decoder, val_loader(val, 4, 0), torch.device("cpu"), 0.5)
    assert seen and not any(seen)


def test_best_checkpoint_agrees_with_the_log(tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every validation beats the one before, so the last step (saved every 2, validated every 3) is the best.
    better = iter(range(1, 100))
    monkeypatch.setattr(stages, "evaluate_pretrain", lambda *a, **k: {"loss": 1.0, "masked_f1": next(better) / 100})
    cfg = load_config(None, tiny(tiny_cache, tmp_path, "name=b", "train.max_steps=4", "train.ckpt_every=2",
                                 "train.eval_every=3"))
    final = pretrain(cfg)
    stage = tmp_path / "b" / "pretrain"
    best = json.loads((stage / "checkpoints" / "best.json").read_text())
    state = torch.load(stage / "checkpoints" / best["dir"] / "state.pt", weights_only=True)
    logged = [l["best_step"] for l in lines(stage / "metrics.jsonl") if l["split"] in ("val", "final")]
    assert final["best_step"] == best["step"] == state["best_step"] == logged[-1] == 4


def _four_steps(tiny_cache: Path, tmp_path: Path, *extra: str) -> tuple[list[str], Path]:
    """A finished 4-step run with checkpoints at steps 2 and 4; its overrides and its checkpoints folder."""
    overrides = tiny(tiny_cache, tmp_path, "name=c", "train.max_steps=4", "train.ckpt_every=2", *extra)
    pretrain(load_config(None, overrides))
    return overrides, tmp_path / "c" / "pretrain" / "checkpoints"


@pytest.mark.parametrize("broken", ["model.safetensors", "state.pt"])
def test_resume_falls_back_past_a_corrupt_checkpoint(broken: str, tiny_cache: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    overrides, ckpts = _four_steps(tiny_cache, tmp_path)
    good = {k: v.clone() for k, v in load_file(str(ckpts / "step_00000004" / "model.safetensors")).items()}  # not a view of the file
    bad = ckpts / "step_00000004" / broken
    truncated = bad.read_bytes()[: bad.stat().st_size // 2]
    bad.write_bytes(truncated)
    capsys.readouterr()
    final = pretrain(load_config(None, overrides), resume=True)
    out = capsys.readouterr().out
    assert "step_00000004 is unreadable" in out and "resumed from" in out and "step_00000002 at step 2" in out
    assert (ckpts / "step_00000004.corrupt" / broken).read_bytes() == truncated  # set aside, not deleted
    again = load_file(str(ckpts / "step_00000004" / "model.safetensors"))
    assert final["step"] == 4 and all(torch.equal(good[k], again[k]) for k in good)  # retrained exactly


def test_missing_latest_folder_never_restarts_the_run(tiny_cache: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    overrides, ckpts = _four_steps(tiny_cache, tmp_path)
    cfg = load_config(None, overrides)
    shutil.rmtree(ckpts / "step_00000004")  # latest.json now names a folder that is gone
    metrics = ckpts.parent / "metrics.jsonl"
    logged = metrics.read_text()
    with pytest.raises(ConfigError, match="already holds checkpoints: pass --resume"):
        pretrain(cfg)
    assert metrics.read_text() == logged and (ckpts / "step_00000002" / "model.safetensors").exists()
    with metrics.open("a") as f:  # and a kill in the middle of writing a log line
        f.write('{"split": "train", "st')
    capsys.readouterr()
    assert pretrain(cfg, resume=True)["step"] == 4
    out = capsys.readouterr().out
    assert "latest.json names step_00000004, which is missing" in out and "step_00000002 at step 2" in out
    assert [l["step"] for l in lines(metrics) if l["split"] == "train"] == [1, 2, 3, 4]


def test_pretraining_resumes_after_the_decoder_settings_changed(tiny_cache: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """Pretraining never reads the decoder's or fine-tuning's sections: a preset whose decoder budget
    was edited while its pretraining was stopped resumes, and the log says nothing of them."""
    overrides, _ = _four_steps(tiny_cache, tmp_path)
    capsys.readouterr()
    changed = ["decoder_train.max_steps=7", "decoder.pos_weight=2", "finetune_train.lr=1e-3"]
    assert pretrain(load_config(None, [*overrides, *changed]), resume=True)["step"] == 4
    out = capsys.readouterr().out
    assert "resumed from" in out and "changed on resume" not in out


def test_resume_may_change_the_learning_rate(tiny_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    overrides, ckpts = _four_steps(tiny_cache, tmp_path)
    capsys.readouterr()
    pretrain(load_config(None, [*overrides, "train.lr=2e-5", "train.warmup_steps=2"]), resume=True)
    out = capsys.readouterr().out
    assert "changed on resume, from step 4 on: train.lr: checkpoint 0.001, now 2e-05" in out
    assert "train.warmup_steps: checkpoint 1, now 2" in out
    with pytest.raises(ConfigError, match=r"config differs .*\n  train.batch_size: checkpoint 4, now 2\nresume with"):
        pretrain(load_config(None, [*overrides, "train.batch_size=2", "train.lr=1e-5"]), resume=True)

    # The advice after a non-finite loss names fields that --resume accepts.
    def diverge(*args, **kwargs):
        raise NonFiniteLoss("loss is nan at step 5 (epoch 0); stopping")

    monkeypatch.setattr(trainer, "train_one_epoch", diverge)
    with pytest.raises(SystemExit, match=r"Lower train.lr .* --resume and, e.g., train.lr=0.0001"):
        pretrain(load_config(None, [*overrides, "name=d", "train.lr=1e-3"]))


class HeadOnEncoder(nn.Module):
    """A small Swin encoder (blocks 1 + 2, inter-stage mask tokens) with a head above it, as the
    training wrappers hold one: forward(batch) -> (loss, parts)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = SwinEncoder(128, 64, embed_dim=8, depths=(1, 2), num_heads=(1, 2), drop_path_rate=0.0,
                                   inter_stage_mask_ratio=0.5)
        self.head = nn.Linear(16, 1)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        return self.head(self.encoder(batch["x"]).latent).square().mean(), {}


def test_layer_decay_group_learning_rates() -> None:
    """Layer ids 0 (patch embedding, tokens), 1 (stage 0's block), 2 (stage 1's merging, its mask token
    and first block), 3 (its second block), 4 (final norm, with the head): lr factors 0.5 ** (4 - id)."""
    model = HeadOnEncoder()
    expected = {"encoder.patch_embed.proj.weight": 1 / 16, "encoder.patch_embed.norm.bias": 1 / 16,
                "encoder.empty_token": 1 / 16, "encoder.mask_token": 1 / 16,
                "encoder.stages.0.blocks.0.attn.qkv.weight": 1 / 8, "encoder.stages.0.blocks.0.attn.logit_scale": 1 / 8,
                "encoder.stages.1.downsample.reduction.weight": 1 / 4, "encoder.stage_mask_tokens.0": 1 / 4,
                "encoder.stages.1.blocks.0.mlp.fc1.weight": 1 / 4, "encoder.stages.1.blocks.1.norm2.bias": 1 / 2,
                "encoder.stages.1.blocks.1.attn.cpb_mlp.2.weight": 1 / 2,
                "encoder.norm.weight": 1.0, "head.weight": 1.0, "head.bias": 1.0}
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.05, layer_decay=0.5)
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    wd = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    assert set(scale) == set(names.values()) == set(wd)
    assert {n: scale[n] for n in expected} == expected
    assert sorted(set(scale.values())) == [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]
    # the weight-decay exclusions are those without layer decay
    assert wd == {names[id(p)]: g["weight_decay"] for g in param_groups(model, 0.05) for p in g["params"]}
    assert wd["encoder.patch_embed.proj.weight"] == 0.05 and wd["encoder.empty_token"] == 0.0
    assert wd["encoder.stage_mask_tokens.0"] == 0.0 and wd["encoder.stages.0.blocks.0.attn.logit_scale"] == 0.0
    # with a prefix factor (the decoder stage's encoder_lr_scale) the two multiply
    scaled = {names[id(p)]: g["lr_scale"] for g in param_groups(model, 0.05, {"encoder.": 0.1}, 0.5) for p in g["params"]}
    assert scaled == pytest.approx({n: s * (0.1 if n.startswith("encoder.") else 1.0) for n, s in scale.items()})
    assert {n: s for n, s in layer_decay_scales(ViTEncoder(128, 64, depth=2, embed_dim=16, num_heads=1), 0.9).items()
            if n in ("patch_embed.weight", "cls_token", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.bias", "norm.weight")} \
        == pytest.approx({"patch_embed.weight": 0.729, "cls_token": 0.729, "blocks.0.attn.qkv.weight": 0.81,
                          "blocks.1.mlp.fc2.bias": 0.9, "norm.weight": 1.0})


def test_schedule_keeps_each_group_scale() -> None:
    """The per-step learning rate is the schedule's value times each group's lr_scale."""
    torch.manual_seed(0)
    model = HeadOnEncoder()
    cfg = TrainConfig(lr=1e-3, min_lr=0.0, warmup_steps=2, progress=False)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05, layer_decay=0.5), lr=cfg.lr)
    x = (torch.rand(2, 1, 128, 64) > 0.9).float()
    seen = []
    train_one_epoch(model, [{"x": x}] * 3, optimizer, step=0, total_steps=10, cfg=cfg, device=torch.device("cpu"), epoch=0,
                    on_step=lambda step, stats: seen.append([(g["lr"], g["lr_scale"]) for g in optimizer.param_groups]))
    for step, lrs in enumerate(seen):
        assert [lr for lr, _ in lrs] == pytest.approx([lr_at(step, 10, cfg) * s for _, s in lrs])
    assert len({s for _, s in seen[0]}) == 5


@pytest.mark.parametrize("version", [1, 2])
def test_param_groups_and_schedules(version: int) -> None:
    cfg = load_config(None, ["objective.mep_weight=1", f"model.version={version}"])
    model = Pretrainer(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.05)
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    attn = "encoder.stages.0.blocks.0.attn."
    position = ({attn + "logit_scale", attn + "cpb_mlp.0.weight", attn + "cpb_mlp.2.weight"} if version == 2
                else {attn + "relative_position_bias_table"})  # timm's exclusions for each version
    assert position | {"encoder.mask_token", "encoder.stages.0.blocks.0.norm1.weight", "encoder.patch_embed.proj.bias",
                       "predictor.level_embed", "predictor.summary_queries.0", "mae_decoder.mask_embed"} <= no_decay
    assert {attn + "qkv.weight", "predictor.pos_embed.weight"} <= decay
    assert not any(n.startswith("teacher.") for n in decay | no_decay)  # the EMA teacher is not optimised
    t = cfg.train
    assert lr_at(0, 1000, t) == pytest.approx(t.lr / t.warmup_steps) and lr_at(t.warmup_steps, 1000, t) == pytest.approx(t.lr)
    assert lr_at(1000, 1000, t) == pytest.approx(t.min_lr)
    assert momentum_at(0, 100, 0.996, 1.0) == pytest.approx(0.996) and momentum_at(100, 100, 0.996, 1.0) == pytest.approx(1.0)


def _same_loss_in_train_and_eval(model: torch.nn.Module, batch: dict) -> bool:
    """Whether a training-mode forward gives the eval-mode loss (same RNG): with no dropout or
    stochastic depth, only inter-stage masking tells the two modes apart."""
    losses = []
    for train in (True, False):
        model.train(train)
        torch.manual_seed(0)
        with torch.no_grad():
            losses.append(model(batch)[0])
    return torch.allclose(*losses, atol=0, rtol=0)


def test_inter_stage_masking_only_in_the_masked_pretraining_forward() -> None:
    torch.manual_seed(0)
    x = (torch.rand(2, 1, 128, 64) > 0.9).float()
    batch = {"x": x, "x2": x.roll(1, dims=-1), "shift1": torch.zeros(2, 2, dtype=torch.long),
             "shift2": torch.tensor([[1, 0], [1, 0]])}
    base = ["model.inter_stage_mask_ratio=0.5", "objective.sigreg_projections=16", "decoder.drop_path_rate=0"]
    masked = Pretrainer(load_config(resolve_config_path("quickstart"), base))  # SimMIM reconstruction: the student is masked
    assert not _same_loss_in_train_and_eval(masked, batch)
    views = Pretrainer(load_config(resolve_config_path("quickstart"), [*base, "objective.recon_weight=0", "objective.mask_ratio=0",
                                                  "objective.lejepa_weight=1"]))
    assert _same_loss_in_train_and_eval(views, batch)  # LeJEPA's unmasked views
    cfg = load_config(resolve_config_path("quickstart"), base)
    finetuned = DecoderTrainer(build_encoder(cfg), build_decoder(cfg), finetune=True)
    assert _same_loss_in_train_and_eval(finetuned, batch)
    everywhere = Pretrainer(load_config(resolve_config_path("quickstart"), [*base, "model.inter_stage_mask_all=true", "objective.recon_weight=0",
                                                       "objective.mask_ratio=0", "objective.lejepa_weight=1"]))
    assert not _same_loss_in_train_and_eval(everywhere, batch)  # asked for in every training forward


def test_align_levels_follow_the_shift() -> None:
    cfg = load_config(None, ["data.crop_width=64", "model.depths=[1,1]", "model.num_heads=[1,2]"])
    enc = build_encoder(cfg).eval()
    x1 = torch.zeros(1, 1, 128, 64)
    x1[0, 0, 60:64, 20:28] = 1
    # View 2 is view 1 moved up 8 semitones and starting 4 steps later: content moves left 4 columns.
    x2 = torch.zeros_like(x1)
    x2[0, 0, 68:72, 16:24] = 1
    s1, s2 = torch.tensor([[0, 0]]), torch.tensor([[4, 8]])
    with torch.no_grad():
        o1, o2 = enc(x1), enc(x2)
    aligned, valid = align_levels(o1, o2, s1, s2)
    fine = o1.patches.finest
    assert torch.equal(aligned[-1][fine.non_empty], o2.patches.finest.emb[o2.patches.finest.non_empty])
    assert valid[-1].float().mean() < 1  # the top rows / last column of view 1 fall outside view 2


def test_metrics() -> None:
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 0, :4] = 1
    probs = torch.zeros_like(target)
    probs[0, :, 0, :2] = 0.9  # sample 0: 2 TP, 2 FN
    probs[1, :, 1, :2] = 0.9  # sample 1: 0 TP, 2 FP, 4 FN
    assert confusion(probs, target).tolist() == [[2, 0, 2, 60], [0, 2, 4, 58]]
    pm = PixelMeter(0.5)
    pm.update(probs, target)
    m = pm.compute()
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.25) and m["threshold"] == 0.5
    assert m["specificity"] == pytest.approx(118 / 120) and m["f1"] == pytest.approx(2 * 2 / (4 + 2 + 6))
    # Masked-patch metrics use each sample's own mask: sample 1 masks nothing in row 0.
    visible = torch.ones(2, 4, dtype=torch.bool)  # 2x2 grid of 4x4 patches
    visible[0, 0] = False
    visible[1, 3] = False
    mm = MaskedPatchMeter(0.5)
    mm.update(probs, target, visible, (4, 4))
    r = mm.compute()
    assert r["masked_recall"] == pytest.approx(0.5)  # sample 0: 2 of 4; sample 1: no notes -> undefined, left out
    assert r["masked_f1"] == pytest.approx(2 / 3)


def test_masked_patch_f1_reads_the_frame_inside_the_piece_and_reports_its_floor() -> None:
    # One 8 x 8 crop of two channels, four 4 x 4 patches, all masked; the piece ends at column 4.
    target = torch.zeros(1, 2, 8, 8)
    target[0, 0, 0, :2] = 1  # two frame pixels in the piece
    target[0, 1, :, :] = 1  # an onset channel full of notes: not scored
    probs = torch.zeros_like(target)
    probs[0, 0, 0, :2] = 0.9  # both frame notes found
    probs[0, 0, :, 4:] = 0.9  # "notes" in the zero padding past the piece's end: not scored
    inside = inside_piece(torch.tensor([0]), torch.tensor([4]), 8)  # (1, 1, 1, 8)
    mm = MaskedPatchMeter(0.5)
    mm.update(probs, target, torch.zeros(1, 4, dtype=torch.bool), (4, 4), inside)
    r = mm.compute()
    assert r["masked_f1"] == 1.0 and r["masked_precision"] == 1.0
    # Saying "note" on all 32 scored pixels finds the 2 notes with 30 false positives.
    assert r["masked_f1_floor"] == pytest.approx(2 * 2 / (2 * 2 + 30))


def test_velocity_roll_scored_against_itself() -> None:
    # A velocity cache holds v / 127: velocity 60 is 0.47, still a note for every metric.
    g = torch.Generator().manual_seed(0)
    roll = (torch.rand(2, 2, 16, 16, generator=g) > 0.7).float() * 60 / 127
    for probs, threshold in ((roll, 0.25), ((roll > 0).float(), 0.5)):  # the roll itself, a perfect prediction
        pm = PixelMeter(threshold)
        pm.update(probs, roll)
        assert pm.compute()["f1"] == 1.0
        mm = MaskedPatchMeter(threshold)
        mm.update(probs, roll, torch.zeros(2, 16, dtype=torch.bool), (4, 4))  # everything masked
        assert mm.compute()["masked_f1"] == 1.0


def _train_cmd(cache: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "midi_rae", "train", "-c", str(REPO / "configs" / "quickstart.yaml"),
            *tiny(cache, out, "name=r", "train.max_steps=40", "train.ckpt_every=3", "train.eval_every=5",
                  "objective.mep_weight=0.5", "objective.lejepa_weight=0.2", "model.drop_path_rate=0.1", *extra)]


def test_resume_after_sigkill_is_exact(tiny_cache: Path, tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    subprocess.run(_train_cmd(tiny_cache, tmp_path / "a"), check=True, env=env, capture_output=True, cwd=REPO)
    killed_at = kill_after_first_checkpoint(_train_cmd(tiny_cache, tmp_path / "b"),
                                            tmp_path / "b" / "r" / "pretrain" / "checkpoints" / "latest.json")
    assert killed_at < 40 and not (tmp_path / "b" / "r" / "pretrain" / "encoder.safetensors").exists()
    resumed = subprocess.run([*_train_cmd(tiny_cache, tmp_path / "b"), "--resume"], env=env, capture_output=True,
                             cwd=REPO, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a = load_file(str(tmp_path / "a" / "r" / "pretrain" / "checkpoints" / "step_00000040" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "r" / "pretrain" / "checkpoints" / "step_00000040" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # encoder, heads and EMA teacher
    steps = [l["step"] for l in lines(tmp_path / "b" / "r" / "pretrain" / "metrics.jsonl") if l["split"] == "train"]
    assert steps == list(range(1, 41))  # the log has every step once: lines after the checkpoint were dropped


def test_grad_checkpointing_may_change_on_resume() -> None:
    """It changes memory and time, not results: switching it (or a checkpoint from before the field
    existed) does not block --resume."""
    on = load_config("quickstart", ["model.grad_checkpointing=true"]).to_dict()
    old = load_config("quickstart").to_dict()
    del old["model"]["grad_checkpointing"]
    assert config_diff(old, on) == []
    assert config_diff(old, load_config("quickstart", ["model.embed_dim=32"]).to_dict()) == ["model.embed_dim: checkpoint 16, now 32"]


def test_logged_values_never_replace_the_lines_own_fields(tmp_path: Path) -> None:
    """A loss part named like a field of the metrics line (a time-stage loss called 'time' once
    replaced the line's timestamp) is an error, not a silent overwrite."""
    log = Logger(tmp_path, load_config(None, ["train.tensorboard=false"]), "pretrain", "train", True, 0)
    log.log("train", 1, {"loss": 1.0, "time_stage": 0.5})
    with pytest.raises(ValueError, match=r"logged values \['time'\] share a name with the line's own fields"):
        log.log("train", 2, {"loss": 1.0, "time": 0.5})
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["time_stage"] == 0.5 and lines[0]["time"] > 1e9


def test_loader_workers_give_the_same_batches(tiny_cache: Path, tmp_path: Path) -> None:
    # Crops are drawn from (seed, epoch, index), not from a process's RNG: loading in worker
    # processes (`data.num_workers`) changes no batch, so neither the losses nor an exact resume
    # from a mid-epoch batch depend on it.
    cfg = load_config(None, tiny(tiny_cache, tmp_path))
    train_ds, _ = datasets(cfg, 0, False)
    spe = trainer.steps_per_epoch(train_ds, cfg.train, Dist())

    def batches(epoch: int, skip: int, workers: int) -> list[torch.Tensor]:
        return [b["x"] for b in trainer.epoch_loader(train_ds, cfg.train, Dist(), epoch, skip, spe, workers)]

    for epoch, skip in [(0, 0), (1, 2)]:
        inline, forked = batches(epoch, skip, 0), batches(epoch, skip, 2)
        assert len(inline) == len(forked) == spe - skip
        assert all(torch.equal(a, b) for a, b in zip(inline, forked))
