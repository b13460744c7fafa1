"""Config: presets parse and build, dotted overrides are typed and validated, errors name the fix."""
from pathlib import Path

import pytest
import torch

from midi_rae.config import Config, ConfigError, from_dict, load_config, preset_dir, resolve_config_path
from midi_rae.models import Pretrainer, build_decoder, build_encoder
from midi_rae.utils import param_count

PRESETS = sorted(preset_dir().glob("*.yaml"))
# The published Swin sizes (https://arxiv.org/abs/2111.09883): embed_dim, depths, num_heads, and the
# encoder's parameter count with one input channel (the README's table; the published ImageNet
# counts add a 3-channel patch embedding and a 1000-class head, and have no empty / mask token).
SWIN_SIZES = {
    "swin_t": (96, [2, 2, 6, 2], [3, 6, 12, 24], 27_575_274),
    "swin_s": (96, [2, 2, 18, 2], [3, 6, 12, 24], 48_956_538),
    "swin_b": (128, [2, 2, 18, 2], [4, 8, 16, 32], 86_889_976),
    "swin_l": (192, [2, 2, 18, 2], [6, 12, 24, 48], 195_197_172),
}
# Building and running these on every test run would take a minute on 2 cores:
# test_swin_size_presets builds them on the meta device instead.
LARGE = {"swin_s", "swin_b", "swin_l"}


def test_presets_exist() -> None:
    assert {p.stem for p in PRESETS} >= {"quickstart", "swin_midi", "swin_midi_p2", "vit_baseline"}


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.stem in LARGE else p for p in PRESETS],
                         ids=lambda p: p.stem)
def test_preset_parses_and_builds(path: Path) -> None:
    cfg = load_config(path)
    model, decoder = Pretrainer(cfg), build_decoder(cfg)
    x = torch.zeros(1, cfg.data.channels, 128, cfg.data.crop_width)
    x[0, 0, 60, :8] = 1
    out = model.encoder(x)
    assert decoder(out).shape == x.shape
    assert from_dict(Config, cfg.to_dict()) == cfg  # the resolved YAML reads back to the same config


def test_load_config_takes_a_preset_name() -> None:
    assert load_config("quickstart") == load_config(preset_dir() / "quickstart.yaml")
    with pytest.raises(ConfigError, match=r"'nope' not found; give a path or a preset name \(.*quickstart"):
        load_config("nope")


def test_spec_encoders() -> None:
    s = load_config(preset_dir() / "swin_midi.yaml").model
    assert (s.patch_h, s.embed_dim, s.depths, s.num_heads, s.window_size) == (4, 8, [1, 2, 2, 6, 2, 1], [1, 1, 2, 4, 8, 16], 8)
    p2 = load_config(preset_dir() / "swin_midi_p2.yaml").model
    assert (p2.patch_h, p2.embed_dim, p2.depths, p2.num_heads) == (2, 4, [1, 1, 2, 2, 6, 2, 1], [1, 1, 1, 2, 4, 8, 16])
    v = load_config(preset_dir() / "vit_baseline.yaml").model
    assert (v.encoder, v.patch_h, v.embed_dim, v.depth, v.num_heads) == ("vit", 16, 256, 4, 8)


@pytest.mark.parametrize("name", SWIN_SIZES)
def test_swin_size_presets(name: str) -> None:
    """Published widths, depths and heads, window 8, patch 4; at 128 x 128 the grids are 32, 16, 8
    and 4, and the last stage's window is clamped to its 4 x 4 grid."""
    dim, depths, heads, params = SWIN_SIZES[name]
    cfg = load_config(name)
    m = cfg.model
    assert (m.embed_dim, m.depths, m.num_heads, m.window_size, m.patch_h, m.patch_w) == (dim, depths, heads, 8, 4, 4)
    assert (cfg.data.crop_width, cfg.data.channels) == (128, 1)
    with torch.device("meta"):  # the structure without allocating (swin_l is 0.8 GB of float32)
        enc = build_encoder(cfg)
    assert param_count(enc) == (params, params)
    assert [(i.grid_size, i.dim, i.window_size) for i in enc.feature_info] == [
        ((4, 4), 8 * dim, (4, 4)), ((8, 8), 4 * dim, (8, 8)), ((16, 16), 2 * dim, (8, 8)), ((32, 32), dim, (8, 8))]


def test_swin_t_levels() -> None:
    """The level shapes feature_info promises are the ones a forward returns, here with the onset
    channel (test_preset_parses_and_builds runs swin_t with one channel)."""
    enc = build_encoder(load_config("swin_t", ["data.channels=2"])).eval()
    x = (torch.rand(2, 2, 128, 128) > 0.97).float()
    with torch.no_grad():
        out = enc(x)
    assert [tuple(lvl.emb.shape) for lvl in out.patches] == [(2, h * w, d) for (h, w), d in
                                                             ((i.grid_size, i.dim) for i in enc.feature_info)]
    assert [lvl.emb.shape[1:] for lvl in out.patches] == [(16, 768), (64, 384), (256, 192), (1024, 96)]
    assert all(torch.isfinite(lvl.emb).all() for lvl in out.patches)


def test_swin_size_impossible_width() -> None:
    with pytest.raises(ConfigError, match=r"^data.crop_width=100 must be divisible by model.patch_w \* 2\*\*\(stages-1\) = "
                                          r"4 \* 8 = 32 for 4 Swin stages, [^\n]*; change [^\n]*data.crop_width "
                                          r"\(the nearest size that works is 96\)$"):
        load_config("swin_b", ["data.crop_width=100"])


def test_overrides_are_typed() -> None:
    cfg = load_config(resolve_config_path("quickstart"), ["model.embed_dim=32", "train.lr=3e-4", "train.clip_grad=null",
                                                          "model.depths=[1,1,2,1]", "data.collections=bach,essenFolksong",
                                                          "train.amp=false", "name=x", "objective.pos_weight=none"])
    assert cfg.model.embed_dim == 32 and cfg.train.lr == 3e-4 and cfg.train.clip_grad is None
    assert cfg.model.depths == [1, 1, 2, 1] and cfg.data.collections == ["bach", "essenFolksong"]
    assert cfg.train.amp is False and cfg.name == "x" and cfg.objective.pos_weight is None
    assert Config().train.lr == load_config(None).train.lr


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", r"unknown config key 'train.lrr'; did you mean train.lr\?"),
    ("modle.embed_dim=4", r"did you mean model\?"),
    ("train.batch_size=big", r"train.batch_size: expected an integer"),
    ("train=1", r"'train' is a section"),
    ("train.lr.x=1", r"'train.lr' is a value"),
    ("train.lr", r"must look like section.key=value"),
    ("data.crop_width=100", r"data.crop_width=100 must be divisible by model.patch_w \* 2\*\*\(stages-1\)"),
    ("model.num_heads=[1,3,4,8]", r"not divisible by model.num_heads\[1\] = 3"),
    ("model.depths=[1,1,1]", r"one head count per Swin stage"),
    ("objective.mask_ratio=0", r"set objective.mask_ratio=0.5"),
    ("objective.recon_weight=0", r"every objective weight is 0"),
    ("model.encoder=vit", r"model.num_heads must be one int for the ViT"),
    ("train.device=tpu", r"train.device must be"),
    ("decoder.skip_levels=[7]", r"decoder.skip_levels must name levels 0..3"),
    ("train.layer_decay=1.5", r"train.layer_decay must be in \(0, 1\] \(e.g. 0.9\) or null"),
    ("model.fold_onsets=true", r"model.fold_onsets .* needs model.encoder=swin and data.channels=2, got swin and 1"),
])
def test_config_errors_name_the_fix(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(resolve_config_path("quickstart"), [override])


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'; did you mean train.epochs\?"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="not found; give a path or a preset name"):
        load_config(tmp_path / "missing.yaml")


def test_inter_stage_masking_is_wired() -> None:
    from midi_rae.models import build_encoder

    cfg = load_config(resolve_config_path("quickstart"), ["model.inter_stage_mask_ratio=0.2"])
    assert build_encoder(cfg).inter_stage_mask_ratio == 0.2


def test_every_field_carries_its_help_text() -> None:
    """`--help` reads the text from each field's metadata (not from this package's source, which
    an installed wheel need not ship): every field has one, and `describe` lists them all."""
    from dataclasses import fields

    from midi_rae.config import DataConfig, DecoderConfig, FinetuneConfig, ModelConfig, ObjectiveConfig, TrainConfig, describe

    sections = {"data", "model", "objective", "train", "decoder", "decoder_train", "finetune", "finetune_train"}
    top = [f for f in fields(Config) if f.name not in sections]
    for cls, own in ((Config, top), *((c, fields(c)) for c in (DataConfig, ModelConfig, ObjectiveConfig, TrainConfig,
                                                                 DecoderConfig, FinetuneConfig))):
        for f in own:
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
    text = describe()
    assert "  train.lr = 0.001  # peak learning rate (AdamW)" in text
    assert "  name = 'run'  # run folder name under out_dir" in text
    assert len([line for line in text.splitlines() if "  # " in line]) == len(top) + sum(
        len(fields(c)) * (3 if c is TrainConfig else 1)
        for c in (DataConfig, ModelConfig, ObjectiveConfig, TrainConfig, DecoderConfig, FinetuneConfig))


def test_rectangular_window_from_the_command_line() -> None:
    """model.window_size=[pitch, time] builds every stage with that window, clamped to its grid,
    and the encoder and its mirrored decoder run with it."""
    cfg = load_config("reference", ["model.window_size=[4,16]"])
    assert cfg.model.window_size == [4, 16]
    enc = build_encoder(cfg).eval()
    # reference: 8 x 2 patches of 128 x 128, five stages, coarsest first
    assert [(i.grid_size, i.window_size) for i in enc.feature_info] == [
        ((1, 4), (1, 4)), ((2, 8), (2, 8)), ((4, 16), (4, 16)), ((8, 32), (4, 16)), ((16, 64), (4, 16))]
    c = cfg.data.channels
    x = (torch.rand(2, c, 128, 128) > 0.97).float()
    out = enc(x)
    logits = build_decoder(cfg)(out)
    assert logits.shape == (2, c, 128, 128)
    assert load_config("reference", ["model.window_size=8"]).model.window_size == 8
