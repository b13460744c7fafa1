"""Transfer across window and input size: weights trained at one window size and crop width run
at another (Swin V2: the position-bias MLP reads offsets on the trained scale; V1: bias tables
resized bicubically; ViT: any width of whole patches)."""
import re
from pathlib import Path

import pytest
import torch
from tiny_runs import isolated, trained_run

from midi_rae.checkpoint import save_weights
from midi_rae.cli import main
from midi_rae.config import ConfigError, load_config
from midi_rae.encode import Embeddings
from midi_rae.models import build_encoder
from midi_rae.runs import load_encoder, trained_windows
from test_encode import long_midi

SWIN = ["data.crop_width=32", "model.depths=[1,2,1]", "model.num_heads=[1,2,4]", "model.window_size=4"]
VIT = ["data.crop_width=32", "model.encoder=vit", "model.patch_h=8", "model.patch_w=8", "model.embed_dim=16",
       "model.num_heads=2", "model.depth=1"]


@pytest.fixture(autouse=True)
def one_thread_own_rng():
    with isolated():
        yield


def saved_encoder(path: Path, overrides: list[str]) -> Path:
    """An encoder.safetensors as `midi-rae train` writes it, with random weights everywhere
    (zero-initialised V2 post-norms would make every block the identity and hide attention)."""
    cfg = load_config(None, overrides)
    encoder = build_encoder(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if not name.endswith("logit_scale"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    save_weights(encoder.state_dict(), path, {"config": cfg.to_yaml(), "kind": "encoder"})
    return path


def rolls(width: int, n: int = 2) -> torch.Tensor:
    return (torch.rand(n, 1, 128, width, generator=torch.Generator().manual_seed(1)) > 0.9).float()


@pytest.mark.parametrize("version", [1, 2])
def test_same_geometry_is_bit_identical(tmp_path: Path, version: int) -> None:
    path = saved_encoder(tmp_path / "encoder.safetensors", SWIN + [f"model.version={version}"])
    original, cfg = load_encoder(path)
    moved, moved_cfg = load_encoder(path, window_size=4, crop_width=32)
    x = rolls(32)
    with torch.no_grad():
        for a, b in zip(original(x).patches, moved(x).patches, strict=True):
            assert torch.equal(a.emb, b.emb)
    assert moved.feature_info == original.feature_info
    if version == 2:
        assert moved_cfg.model.pretrained_window_sizes == [list(w) for w in trained_windows(cfg)]


@pytest.mark.parametrize("version", [1, 2])
def test_weights_run_at_a_larger_window_and_width(tmp_path: Path, version: int) -> None:
    path = saved_encoder(tmp_path / "encoder.safetensors", SWIN + [f"model.version={version}"])
    original, cfg = load_encoder(path)
    # strict load (load_weights raises on a missing, unexpected or misshapen key)
    moved, moved_cfg = load_encoder(path, window_size=8, crop_width=128)
    assert (moved_cfg.model.window_size, moved_cfg.data.crop_width) == (8, 128)
    assert [i.window_size for i in moved.feature_info] == [(8, 8), (8, 8), (8, 8)]  # grids 8x8, 16x16, 32x32
    x = rolls(128)
    out = moved(x)
    assert [lvl.num_patches for lvl in out.patches] == [64, 256, 1024]
    assert all(torch.isfinite(lvl.emb).all() for lvl in out.patches)
    old, new = original.state_dict(), moved.state_dict()
    for key in old:
        if key.endswith("relative_position_bias_table"):  # V1: (2w-1)^2 offsets of each block's new window
            assert new[key].shape == (15 * 15, old[key].shape[1])
        else:  # everything else, the V2 position-bias MLP included, as trained
            assert torch.equal(new[key], old[key])
    if version == 2:  # the offsets the MLP was trained on keep their bias at the larger window
        with torch.no_grad():
            for old_stage, new_stage in zip(original.stages, moved.stages):
                a, b = old_stage.blocks[0].attn, new_stage.blocks[0].attn
                (th, tw), (nh, nw) = a.window_size, b.window_size
                trained_bias = a.cpb_mlp(a.relative_coords_table)  # (2th-1, 2tw-1, nH)
                moved_bias = b.cpb_mlp(b.relative_coords_table)[nh - th: nh + th - 1, nw - tw: nw + tw - 1]
                torch.testing.assert_close(moved_bias, trained_bias, rtol=0, atol=1e-6)
    moved.train()  # fine-tuning at the new geometry: finite gradients
    sum(lvl.emb.square().mean() for lvl in moved(x).patches).backward()
    assert all(torch.isfinite(p.grad).all() for p in moved.parameters() if p.grad is not None)


def test_v2_transfer_is_remembered_when_saved_again(tmp_path: Path) -> None:
    """A transferred encoder saved with its config loads back as it was, and moving it once more
    keeps the windows the MLP was first trained at."""
    path = saved_encoder(tmp_path / "encoder.safetensors", SWIN)
    trained = [list(w) for w in trained_windows(load_encoder(path)[1])]
    moved, cfg = load_encoder(path, window_size=8, crop_width=128)
    again = tmp_path / "moved.safetensors"
    save_weights(moved.state_dict(), again, {"config": cfg.to_yaml(), "kind": "encoder"})
    reloaded, reloaded_cfg = load_encoder(again)
    assert reloaded_cfg.model.pretrained_window_sizes == trained
    x = rolls(128)
    with torch.no_grad():
        assert torch.equal(moved(x).latent, reloaded(x).latent)
    assert load_encoder(again, window_size=16, crop_width=256)[1].model.pretrained_window_sizes == trained


def test_vit_runs_at_another_width(tmp_path: Path) -> None:
    path = saved_encoder(tmp_path / "encoder.safetensors", VIT)
    moved, cfg = load_encoder(path, crop_width=64)
    assert cfg.data.crop_width == 64 and moved.img_size == (128, 64)
    assert all(torch.isfinite(lvl.emb).all() for lvl in moved(rolls(64)).patches)


@pytest.mark.parametrize("encoder,kwargs,says", [
    ("swin", dict(crop_width=100), "crop_width=100 must be a positive multiple of 16 (patch_w 4 * 2**2, one "
                                   "halving per stage) for this encoder; use 96 or 112"),
    ("swin", dict(crop_width=0), "use 16"),
    ("swin", dict(window_size=0), "use 1 to 32"),
    ("swin", dict(window_size=64, crop_width=64), "window_size=64 does not fit the 32 x 16 patch grid"),
    ("vit", dict(crop_width=60), "multiple of 8 (patch_w 8) for this encoder; use 56 or 64"),
    ("vit", dict(window_size=8), "window_size applies to Swin encoders"),
])
def test_impossible_size_says_what_to_change(tmp_path: Path, encoder: str, kwargs: dict, says: str) -> None:
    path = saved_encoder(tmp_path / "encoder.safetensors", SWIN if encoder == "swin" else VIT)
    with pytest.raises(ValueError, match=re.escape(says)) as e:
        load_encoder(path, **kwargs)
    assert "\n" not in str(e.value)


def test_pretrained_window_sizes_is_for_swin_v2() -> None:
    with pytest.raises(ConfigError, match="V1 bias tables are resized"):
        load_config(None, SWIN + ["model.version=1", "model.pretrained_window_sizes=[4,4,4]"])
    with pytest.raises(ConfigError, match="one positive window"):
        load_config(None, SWIN + ["model.pretrained_window_sizes=[4,4]"])


def test_encode_command_at_another_geometry(tiny_cache: Path, tmp_path_factory, tmp_path: Path, capsys) -> None:
    run = trained_run("swin", tiny_cache, tmp_path_factory)  # trained on 32-step crops, window 4
    midi = long_midi(tmp_path / "long.mid")
    out = tmp_path / "emb.safetensors"
    assert main(["encode", str(run), str(midi), "-o", str(out), "--window-size", "8", "--crop-width", "64"]) == 0
    e = Embeddings.load(out)
    assert e.window == 64 and e.hop == 64 and e.steps == 100
    assert [lvl.info.window_size for lvl in e.levels] == [(8, 8), (8, 8)]  # grids 16 x 8 and 32 x 16
    assert all(torch.isfinite(lvl.emb).all() for lvl in e.levels)
    capsys.readouterr()
    assert main(["encode", str(run), str(midi), "-o", str(out), "--crop-width", "50"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith("use 48 or 56"), err


def test_fold_onsets_survives_save_and_load(tmp_path: Path) -> None:
    """An encoder trained with model.fold_onsets is rebuilt folded from its weights file alone."""
    path = saved_encoder(tmp_path / "encoder.safetensors", SWIN + ["data.channels=2", "model.fold_onsets=true"])
    encoder, cfg = load_encoder(path)
    assert cfg.model.fold_onsets and encoder.in_chans == 2 and encoder.patch_embed.proj.in_channels == 1
    x = torch.cat([rolls(32, 1), rolls(32, 1)], 1)
    with torch.no_grad():
        assert encoder(x).patches.finest.emb.isfinite().all()
