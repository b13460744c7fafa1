"""Config: presets parse and build, dotted overrides are typed and validated, errors name the fix."""
from pathlib import Path

import pytest
import torch

from midi_rae.config import Config, ConfigError, from_dict, load_config, preset_dir, resolve_config_path
from midi_rae.models import Pretrainer, build_decoder

PRESETS = sorted(preset_dir().glob("*.yaml"))


def test_presets_exist() -> None:
    assert {p.stem for p in PRESETS} >= {"quickstart", "swin_midi", "swin_midi_p2", "vit_baseline"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
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
