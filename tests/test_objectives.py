"""The global (piece-level) objectives, the coarse-only MAE decoder and the 'piece' views."""
import copy
import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from midi_rae.config import ConfigError, load_config
from midi_rae.dataset import PianoRollDataset
from midi_rae.descriptors import NAMES as DESCRIPTOR_NAMES
from midi_rae.descriptors import RHYTHM, descriptors
from midi_rae.losses import info_nce, isotropy_loss, lejepa_global, masked_recon_loss, mep_loss, patches_at, recon_bce
from midi_rae.models import DescriptorHead, Pretrainer
from midi_rae.swin import SwinDecoder, SwinEncoder, SwinMAEDecoder

SMALL = ["data.crop_width=32", "model.embed_dim=8", "model.depths=[1,1,1]", "model.num_heads=[1,2,4]",
         "model.window_size=4", "model.mae_decoder_dim=16", "model.mae_decoder_heads=2"]


def test_info_nce_prefers_matching_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 32, generator=g)
    matched, shuffled = info_nce(z, z + 0.01 * torch.randn(16, 32, generator=g)), info_nce(z, z[torch.randperm(16, generator=g)])
    assert matched < 0.1 < shuffled
    assert torch.isclose(info_nce(z, z.roll(1, 0)), info_nce(z.roll(1, 0), z))  # symmetric in the views


def test_lejepa_global_is_invariance_plus_sigreg() -> None:
    z = torch.randn(64, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert lejepa_global(z, z, lam=0.0) == 0
    loss = lejepa_global(z, z + 1, lam=0.5)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0.5 * 1.0 and torch.isfinite(z.grad).all()


def test_coarse_only_mae_decoder_ignores_the_fine_levels() -> None:
    enc = SwinEncoder(img_height=32, img_width=32, embed_dim=8, depths=(1, 1, 1), num_heads=(1, 2, 4), window_size=4)
    dec = SwinMAEDecoder(32, 32, embed_dim=8, num_levels=3, decoder_dim=16, depth=1, num_heads=2, window_size=4,
                         read_levels=1)
    out = enc((torch.rand(2, 1, 32, 32) > 0.9).float())
    before = dec(out)
    for lvl in list(out.patches)[1:]:  # change every level but the coarsest
        lvl.emb = torch.randn_like(lvl.emb)
    assert torch.equal(before, dec(out)) and len(dec.lateral) == 1 and dec.pos_embed is not None


def test_coarse_only_mae_decoder_does_not_see_the_mask() -> None:
    """The mask is drawn mostly over patches that hold notes, so a finest-grid map of it tells where
    the notes are: a decoder that reads only the coarse levels must get nothing from it, and a
    sample of a nested draw that reads fewer than every level neither."""
    enc = SwinEncoder(img_height=32, img_width=32, embed_dim=8, depths=(1, 1, 1), num_heads=(1, 2, 4), window_size=4)
    x = (torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)) > 0.9).float()
    out = enc(x, mask_ratio=0.5)
    other = copy.copy(out)
    other.mae_mask = ~out.mae_mask  # the same levels, another mask
    coarse = SwinMAEDecoder(32, 32, embed_dim=8, num_levels=3, decoder_dim=16, depth=1, num_heads=2, window_size=4,
                            read_levels=2)
    assert coarse.mask_embed is None and torch.equal(coarse(out), coarse(other))
    full = SwinMAEDecoder(32, 32, embed_dim=8, num_levels=3, decoder_dim=16, depth=1, num_heads=2, window_size=4)
    assert not torch.allclose(full(out), full(other))  # reading the finest level, it is told what was masked
    levels = torch.tensor([2, 3])
    a, b = full(out, levels), full(other, levels)
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_nested_levels_read_each_samples_coarsest_levels_only() -> None:
    """levels[b] = k: sample b is decoded as if the decoder read its k coarsest levels, the
    finer ones changing nothing, in forward and in patch_logits alike."""
    enc = SwinEncoder(img_height=32, img_width=32, embed_dim=8, depths=(1, 1, 1), num_heads=(1, 2, 4), window_size=4)
    dec = SwinMAEDecoder(32, 32, embed_dim=8, num_levels=3, decoder_dim=16, depth=1, num_heads=2, window_size=4,
                         read_levels=2)
    out = enc((torch.rand(3, 1, 32, 32) > 0.9).float())
    levels = torch.tensor([1, 2, 2])
    before = dec(out, levels)
    assert not torch.allclose(before, dec(out))
    assert torch.allclose(before[1:], dec(out)[1:])
    out.patches[1].emb = torch.randn_like(out.patches[1].emb)  # sample 0 does not read level 1
    after = dec(out, levels)
    assert torch.equal(before[0], after[0]) and not torch.allclose(before[1:], after[1:])
    select = torch.rand(3, 64) > 0.5
    picked = after.reshape(3, 1, 8, 4, 8, 4).permute(0, 2, 4, 1, 3, 5).reshape(3, 64, 1, 4, 4)[select]
    assert torch.allclose(dec.patch_logits(out, select, levels), picked, atol=1e-5)


def test_nested_recon_draws_the_levels_per_sample(tiny_cache: Path) -> None:
    """objective.recon_nested: the reconstruction loss is the decoder's with k coarsest levels
    per sample, k drawn after the encoder's mask from the same generator."""
    over = [f"data.cache_dir={tiny_cache}", *SMALL, "objective.recon_levels=2", "objective.pos_weight=4"]
    model = Pretrainer(load_config(None, [*over, "objective.recon_nested=true"])).eval()
    ds = PianoRollDataset(tiny_cache, crop_width=32, channels=1)
    x = torch.stack([ds[i]["x"] for i in range(6)])
    torch.manual_seed(0)
    _, parts = model({"x": x})
    torch.manual_seed(0)
    student = model.encoder(x, mask_ratio=0.5)
    levels = torch.randint(1, 3, (6,))
    assert 0 < (levels == 1).sum() < 6
    expect = masked_recon_loss(model.mae_decoder(student, levels), x, student.mae_mask, (4, 4), pos_weight=4.0)
    assert torch.allclose(parts["recon"], expect, atol=1e-6)
    with pytest.raises(ConfigError, match="recon_nested"):
        load_config(None, ["objective.recon_nested=true", "objective.recon_weight=0", "objective.descriptor_weight=1"])


def test_swin_decoder_nested_levels_read_each_samples_coarsest_levels_only() -> None:
    """SwinDecoder(levels=...): sample b is decoded from the levels under levels[b] alone; the
    full count is the plain forward."""
    enc = SwinEncoder(img_height=32, img_width=32, embed_dim=8, depths=(1, 1, 1), num_heads=(1, 2, 4), window_size=4)
    dec = SwinDecoder(32, 32, embed_dim=8, depths=(1, 1, 1), num_heads=(1, 2, 4), window_size=4, skip_levels=[0, 1])
    assert dec.read_levels == 2
    out = enc((torch.rand(3, 1, 32, 32) > 0.9).float())
    levels = torch.tensor([1, 2, 2])
    before = dec(out, levels)
    assert torch.equal(dec(out), dec(out, torch.full((3,), 2)))
    assert torch.allclose(before[1:], dec(out)[1:]) and not torch.allclose(before[0], dec(out)[0])
    out.patches[1].emb = torch.randn_like(out.patches[1].emb)  # sample 0 does not read level 1
    after = dec(out, levels)
    assert torch.equal(before[0], after[0]) and not torch.allclose(before[1:], after[1:])


def test_recon_decoder_swin_is_the_mirrored_decoder_of_the_coarse_levels(tiny_cache: Path) -> None:
    """objective.recon_decoder=swin: the reconstruction (and coarse autoencoder) decoders are
    SwinDecoders reading the configured coarsest levels; the loss is theirs, nested per sample."""
    over = [f"data.cache_dir={tiny_cache}", *SMALL, "objective.recon_levels=2", "objective.pos_weight=4",
            "objective.recon_decoder=swin", "objective.recon_nested=true", "objective.coarse_ae_weight=1",
            "objective.coarse_ae_levels=1"]
    model = Pretrainer(load_config(None, over)).eval()
    assert isinstance(model.mae_decoder, SwinDecoder) and model.mae_decoder.skip_levels == [0, 1]
    assert isinstance(model.coarse_decoder, SwinDecoder) and model.coarse_decoder.skip_levels == [0]
    ds = PianoRollDataset(tiny_cache, crop_width=32, channels=1)
    x = torch.stack([ds[i]["x"] for i in range(8)])
    torch.manual_seed(0)
    loss, parts = model({"x": x})
    torch.manual_seed(0)
    model.encoder(x[4:], mask_ratio=0.0)  # the coarse autoencoder's half draws first
    student = model.encoder(x[:4], mask_ratio=0.5)
    levels = torch.randint(1, 3, (4,))
    expect = masked_recon_loss(model.mae_decoder(student, levels), x[:4], student.mae_mask, (4, 4), pos_weight=4.0)
    assert torch.allclose(parts["recon"], expect, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.mae_decoder.parameters())
    for preset, bad, why in ((None, "unet", "unet"), ("vit_reference", "swin", "vit")):
        with pytest.raises(ConfigError, match=f"recon_decoder.*{why}"):
            load_config(preset, [f"objective.recon_decoder={bad}"])


def test_pretrainer_global_objective_trains_every_head(tiny_cache: Path, tmp_path: Path) -> None:
    cfg = load_config(None, [f"data.cache_dir={tiny_cache}", f"out_dir={tmp_path}", *SMALL, "data.view_mode=piece",
                             "objective.global_weight=1", "objective.recon_levels=2", "objective.recon_visible_weight=1"])
    model = Pretrainer(cfg)
    assert model.needs_views
    ds = PianoRollDataset(tiny_cache, crop_width=32, pair=True, view_mode="piece", channels=1)
    batch = {k: torch.stack([ds[i][k] for i in range(8)]) for k in ("x", "x2", "shift1", "shift2")}
    loss, parts = model(batch)
    loss.backward()
    assert set(parts) == {"recon", "global"} and torch.isfinite(loss)
    assert all(p.grad is not None for p in model.projector.parameters())
    for name in ("lejepa",):
        cfg2 = load_config(None, [f"data.cache_dir={tiny_cache}", *SMALL, "objective.global_weight=1",
                                  "objective.global_loss=" + name, "data.view_mode=piece"])
        assert torch.isfinite(Pretrainer(cfg2)(batch)[0])


def test_global_in_batch_trains_every_objective_on_both_views(tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """objective.global_in_batch: the two views are one batch of 2B crops, encoded once; the
    reconstruction reads all 2B, InfoNCE pairs crop i with crop B + i."""
    over = [f"data.cache_dir={tiny_cache}", *SMALL, "data.view_mode=piece", "objective.mask_ratio=0",
            "objective.recon_visible_weight=1", "objective.recon_levels=2", "objective.global_weight=1"]
    model = Pretrainer(load_config(None, [*over, "objective.global_in_batch=true"])).eval()
    ds = PianoRollDataset(tiny_cache, crop_width=32, pair=True, view_mode="piece", channels=1)
    batch = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ("x", "x2", "shift1", "shift2")}
    calls = []
    forward = model.encoder.forward
    monkeypatch.setattr(model.encoder, "forward", lambda x, **kw: calls.append(len(x)) or forward(x, **kw))
    loss, parts = model(batch)
    assert calls == [8] and set(parts) == {"recon", "global"}
    both = torch.cat([batch["x"], batch["x2"]])
    out = forward(both)
    assert torch.allclose(parts["recon"], recon_bce(model.mae_decoder(out), both, None), atol=1e-6)
    z = model.projector(out)
    assert torch.allclose(parts["global"], info_nce(z[:4], z[4:], 0.1), atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.projector.parameters())
    for bad in ("objective.global_weight=0", "objective.coarse_ae_weight=0.5"):
        with pytest.raises(ConfigError, match="global_in_batch"):
            load_config(None, [*over, "objective.global_in_batch=true", bad])


def test_piece_views_come_from_other_passages(tiny_cache: Path) -> None:
    kw = dict(crop_width=16, pair=True, max_time_shift=0, max_pitch_shift=0, channels=1)
    same = PianoRollDataset(tiny_cache, **kw)
    other = PianoRollDataset(tiny_cache, view_mode="piece", **kw)
    assert all(torch.equal(same[i]["x"], same[i]["x2"]) for i in range(10))
    assert sum(not torch.equal(other[i]["x"], other[i]["x2"]) for i in range(10)) >= 5
    assert all(same[i]["piece_id"] == other[i]["piece_id"] for i in range(10))


def test_mask_ratio_zero_is_a_plain_coarse_autoencoder(tiny_cache: Path) -> None:
    """mask_ratio 0 with recon_visible_weight 1: nothing masked, and the loss is the BCE over
    every pixel of the roll decoded from the coarsest level alone."""
    cfg = load_config(None, [f"data.cache_dir={tiny_cache}", *SMALL, "objective.mask_ratio=0",
                             "objective.recon_visible_weight=1", "objective.recon_levels=1", "objective.pos_weight=4"])
    model = Pretrainer(cfg).eval()
    ds = PianoRollDataset(tiny_cache, crop_width=32, channels=1)
    x = torch.stack([ds[i]["x"] for i in range(4)])
    loss, parts = model({"x": x})
    out = model.encoder(x)
    assert out.mae_mask.all()
    assert torch.allclose(loss, recon_bce(model.mae_decoder(out), x, 4.0), atol=1e-6)


def test_coarse_ae_splits_the_batch_between_masked_and_coarse_autoencoding(tiny_cache: Path) -> None:
    """coarse_ae_weight: the first half of the batch feeds the masked objective, the second half
    is encoded unmasked and decoded from the coarsest level alone; the total is the weighted sum."""
    cfg = load_config(None, [f"data.cache_dir={tiny_cache}", *SMALL, "objective.coarse_ae_weight=0.5",
                             "objective.coarse_ae_levels=1", "objective.pos_weight=4"])
    model = Pretrainer(cfg).eval()
    assert model.mae_decoder.read_levels == 3 and model.coarse_decoder.read_levels == 1
    ds = PianoRollDataset(tiny_cache, crop_width=32, channels=1)
    x = torch.stack([ds[i]["x"] for i in range(5)])
    torch.manual_seed(0)
    loss, parts = model({"x": x})
    ae = recon_bce(model.coarse_decoder(model.encoder(x[3:])), x[3:], 4.0)
    plain = Pretrainer(load_config(None, [f"data.cache_dir={tiny_cache}", *SMALL, "objective.pos_weight=4"])).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("coarse_decoder.")})
    torch.manual_seed(0)  # the same mask, drawn for the first three crops only
    assert torch.allclose(parts["recon"], plain({"x": x[:3]})[1]["recon"], atol=1e-6)
    assert set(parts) == {"recon", "coarse_ae"}
    assert torch.allclose(parts["coarse_ae"], ae, atol=1e-6)
    assert torch.allclose(loss, parts["recon"] + 0.5 * parts["coarse_ae"])
    loss.backward()
    assert all(p.grad is not None for p in model.coarse_decoder.lateral.parameters())


def _descriptor_model(tiny_cache: Path, *overrides: str) -> tuple[Pretrainer, torch.Tensor]:
    """A small pretrainer with these settings, in training mode, and a batch of 4 crops of the tiny cache."""
    model = Pretrainer(load_config(None, [f"data.cache_dir={tiny_cache}", *SMALL, *overrides])).train()
    ds = PianoRollDataset(tiny_cache, crop_width=32, channels=1)
    return model, torch.stack([ds[i]["x"] for i in range(4)])  # (4, 1, 128, 32)


def _standardised(target: torch.Tensor, head: DescriptorHead) -> torch.Tensor:
    """(B, F): descriptors standardised by their own batch's statistics, as the head's first batch is."""
    return (target - target.mean(0)) / (target.var(0, unbiased=False) + head.eps).sqrt()


def test_descriptor_objective_regresses_the_whole_crops_standardised_descriptors(tiny_cache: Path) -> None:
    """descriptor_weight: a linear head on every level's non-empty mean of the masked view
    regresses the descriptors of the whole crop; the first training batch sets the running
    statistics, later ones move them, and evaluation leaves them alone."""
    model, x = _descriptor_model(tiny_cache, "objective.descriptor_weight=0.5")
    head = model.descriptor_head
    target = descriptors(x)
    torch.manual_seed(0)
    loss, parts = model({"x": x})
    assert set(parts) == {"recon", "descriptors"}
    assert torch.allclose(loss, parts["recon"] + 0.5 * parts["descriptors"])
    assert torch.allclose(head.target_mean, target.mean(0)) and bool(head.seen)
    torch.manual_seed(0)  # the same mask: the student's view the head read
    out = model.encoder(x, mask_ratio=model.objective.mask_ratio)
    pred = head.linear(torch.cat([lvl.pooled() for lvl in out.patches], -1))
    assert torch.allclose(parts["descriptors"], ((pred - _standardised(target, head)) ** 2).mean(), atol=1e-5)
    loss.backward()
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0 and head.linear.weight.grad is not None

    model({"x": x.flip(-1)})  # a second batch moves the statistics by the momentum
    moved = target.mean(0).lerp(descriptors(x.flip(-1)).mean(0), head.momentum)
    assert torch.allclose(head.target_mean, moved, atol=1e-6)
    model.eval()({"x": x})
    assert torch.allclose(head.target_mean, moved, atol=1e-6)
    assert {"descriptor_head.target_mean", "descriptor_head.target_var"} <= set(model.state_dict())


def test_descriptor_rhythm_weight_scales_only_the_rhythm_features_errors(tiny_cache: Path) -> None:
    """descriptor_rhythm_weight=w: the squared errors of the inter-onset-interval and onset-
    autocorrelation features count w times, every other feature's once; it is a setting, not
    part of the weights file, and a negative weight is a config error."""
    model, x = _descriptor_model(tiny_cache, "objective.descriptor_weight=1", "objective.descriptor_rhythm_weight=4")
    head = model.descriptor_head
    out = model.encoder(x)
    loss = head.loss(out, x)
    z = _standardised(descriptors(x), head)
    err = (head.linear(torch.cat([lvl.pooled() for lvl in out.patches], -1)) - z) ** 2  # (B, F)
    rhythm = [i for i, n in enumerate(DESCRIPTOR_NAMES) if n.startswith(("ioi_", "onset_autocorr_"))]
    assert len(rhythm) == 48
    rest = [i for i in range(len(DESCRIPTOR_NAMES)) if i not in rhythm]
    expected = (4 * err[:, rhythm].sum() + err[:, rest].sum()) / err.numel()
    assert torch.allclose(loss, expected, atol=1e-5)
    assert not any("feature_weight" in k for k in model.state_dict())
    with pytest.raises(ConfigError, match="descriptor_rhythm_weight must be >= 0 and finite, got -1"):
        load_config(None, [*SMALL, "objective.descriptor_weight=1", "objective.descriptor_rhythm_weight=-1"])


def test_descriptor_head_that_skips_the_coarse_levels_leaves_them_to_the_reconstruction(tiny_cache: Path) -> None:
    """descriptor_skip_levels=1: the head reads the finer levels only, so its loss does not
    depend on the coarsest level and sends it no gradient."""
    cfg = load_config(None, [f"data.cache_dir={tiny_cache}", *SMALL, "objective.descriptor_weight=1",
                             "objective.descriptor_skip_levels=1"])
    model = Pretrainer(cfg).train()
    dims = [info.dim for info in model.encoder.feature_info]  # coarsest first
    assert model.descriptor_head.linear.in_features == sum(dims[1:])
    ds = PianoRollDataset(tiny_cache, crop_width=32, channels=1)
    x = torch.stack([ds[i]["x"] for i in range(4)])
    out = model.encoder(x)
    coarse, fine = out.patches[0].emb, out.patches[1].emb
    coarse.retain_grad(), fine.retain_grad()
    model.descriptor_head.loss(out, x).backward()
    assert coarse.grad is None and fine.grad.abs().sum() > 0
    assert model.descriptor_head.linear.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="descriptor_skip_levels must leave the descriptor head a level: 0..2"):
        load_config(None, [*SMALL, "objective.descriptor_weight=1", "objective.descriptor_skip_levels=3"])


def test_isotropy_objective_reads_the_coarse_levels_only(tiny_cache: Path) -> None:
    """isotropy_levels=1: the term is SIGReg on the coarsest level's non-empty tokens, sends that
    level a gradient and the finer ones none."""
    cfg = load_config(None, [f"data.cache_dir={tiny_cache}", *SMALL, "objective.recon_weight=0",
                             "objective.isotropy_weight=1", "objective.isotropy_levels=1"])
    model = Pretrainer(cfg).train()
    ds = PianoRollDataset(tiny_cache, crop_width=32, channels=1)
    x = torch.stack([ds[i]["x"] for i in range(8)])
    torch.manual_seed(0)
    loss, parts = model({"x": x})
    assert set(parts) == {"isotropy"} and torch.equal(loss, parts["isotropy"])
    torch.manual_seed(0)
    out = model.encoder(x)
    coarse, fine = out.patches[0].emb, out.patches[1].emb
    coarse.retain_grad(), fine.retain_grad()
    again = isotropy_loss([coarse], [out.patches[0].non_empty], cfg.objective.sigreg_projections)
    torch.testing.assert_close(again, parts["isotropy"])
    again.backward()
    assert coarse.grad.abs().sum() > 0 and fine.grad is None
    with pytest.raises(ConfigError, match="isotropy_levels must be 1..3"):
        load_config(None, [*SMALL, "objective.isotropy_weight=1", "objective.isotropy_levels=4"])


def test_objectives_reading_the_unmasked_encoding_share_one_forward(tiny_cache: Path) -> None:
    """Without a masked student or views, the descriptor head, the isotropy term and the anchor
    read one unmasked encoding of the batch: the encoder runs once, not once per objective."""
    cfg = load_config(None, [f"data.cache_dir={tiny_cache}", *SMALL, "objective.recon_weight=0",
                             "objective.descriptor_weight=1", "objective.isotropy_weight=1", "objective.anchor_weight=1"])
    model = Pretrainer(cfg).train()
    calls = []
    model.encoder.register_forward_hook(lambda *_: calls.append(1))
    ds = PianoRollDataset(tiny_cache, crop_width=32, channels=1)
    _, parts = model({"x": torch.stack([ds[i]["x"] for i in range(4)])})
    assert set(parts) == {"descriptors", "isotropy", "anchor"} and len(calls) == 1


def test_impossible_objective_configs_are_refused() -> None:
    with pytest.raises(ConfigError, match="data.view_mode=shift"):
        load_config(None, ["objective.lejepa_weight=1", "data.view_mode=piece"])
    with pytest.raises(ConfigError, match="recon_levels must be 1..6"):
        load_config(None, ["objective.recon_levels=7"])
    with pytest.raises(ConfigError, match="coarse_ae_levels must be 1..6"):
        load_config(None, ["objective.coarse_ae_weight=1", "objective.coarse_ae_levels=0"])
    with pytest.raises(ConfigError, match="objective.recon_levels=2 instead"):
        load_config(None, ["objective.coarse_ae_weight=1", "objective.recon_weight=0"])
    with pytest.raises(ConfigError, match="objective weights must be >= 0"):
        load_config(None, ["objective.descriptor_weight=-1"])
    with pytest.raises(ConfigError, match="global_loss"):
        load_config(None, ["objective.global_loss=simclr"])


def test_mep_loss_from_the_masked_positions_alone_equals_the_dense_one() -> None:
    """Pretrainer predicts only the positions the loss reads: same loss and gradients as
    predicting every position and masking the loss."""
    cfg = load_config(None, [*SMALL, "objective.mep_weight=1", "objective.recon_weight=0"])
    torch.manual_seed(0)
    model = Pretrainer(cfg)
    x = (torch.rand(4, 1, 128, 32) > 0.9).float()
    student, target = model.encoder(x, mask_ratio=0.5), model.teacher(x)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(1)
    loss = model._mep(student, target)
    torch.manual_seed(1)
    preds, pred_masks = model.predictor(student)
    masks = [pm & lvl.mae_mask for pm, lvl in zip(pred_masks, student.patches)]
    dense = mep_loss(preds, target.patches.all_emb, masks, normalize_targets=cfg.objective.mep_normalize_targets)
    torch.testing.assert_close(loss, dense)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    dense_grads = torch.autograd.grad(dense, params, allow_unused=True)
    for g, d in zip(grads, dense_grads, strict=True):
        assert (g is None) == (d is None)
        if g is not None:
            torch.testing.assert_close(g, d, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("depth", [1, 2])
def test_recon_loss_from_the_masked_patches_alone_equals_the_dense_one(depth: int) -> None:
    """Pretrainer decodes only the masked patches past the last attention: the same logits there,
    the same loss and gradients as decoding every patch."""
    cfg = load_config(None, [*SMALL, f"model.mae_decoder_depth={depth}", "objective.pos_weight=4"])
    torch.manual_seed(0)
    model = Pretrainer(cfg)
    x = (torch.rand(4, 1, 128, 32) > 0.9).float()
    student = model.encoder(x, mask_ratio=0.5)
    hidden = ~student.mae_mask
    dense_logits = model.mae_decoder(student)  # (B, C, H, W)
    torch.testing.assert_close(model.mae_decoder.patch_logits(student, hidden),
                               patches_at(dense_logits, hidden, model.patch_size), rtol=1e-5, atol=1e-6)
    loss = model._recon(student, x)
    dense = masked_recon_loss(dense_logits, x, student.mae_mask, model.patch_size, 0.0, 4.0)
    torch.testing.assert_close(loss, dense)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    for g, d in zip(grads, torch.autograd.grad(dense, params, allow_unused=True), strict=True):
        assert (g is None) == (d is None)
        if g is not None:
            torch.testing.assert_close(g, d, rtol=1e-4, atol=1e-7)


def test_every_objective_study_row_is_a_valid_config() -> None:
    """benchmarks/objective_study.py's rows are dotted overrides: each must load over the presets
    the study runs on, or a study of hours would fail at its first job."""
    path = Path(__file__).parents[1] / "benchmarks" / "objective_study.py"
    spec = importlib.util.spec_from_file_location("objective_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    for preset in ("reference", "quickstart"):
        for row, overrides in study.ROWS.items():
            cfg = load_config(preset, overrides)
            assert cfg.objective.recon_nested == row.endswith("_nested"), row
            # a row that does not name it must not inherit the preset's (the reference skips 2)
            assert (cfg.objective.descriptor_skip_levels > 0) == ("_fine" in row), row
            assert (cfg.objective.isotropy_weight > 0) == ("_iso" in row), row
            assert (cfg.objective.descriptor_rhythm_weight == 0) == row.endswith("_r0"), row
    # the row the study names as the `reference` preset's objective is exactly that preset over itself
    assert load_config("reference", study.ROWS["coarse_ae_m0_desc25_p82_swindec_iso005_r0"]) == load_config("reference", [])


def test_vit_reference_trains_the_reference_objective() -> None:
    """Swin against ViT (issue 10) compares encoders: `vit_reference` trains the `reference`
    preset's objective, but for what only the Swin has (decoding from its two coarsest levels
    through the mirrored Swin decoder)."""
    swin, vit = load_config("reference", []).objective, load_config("vit_reference", []).objective
    swin_only = {"recon_levels", "recon_decoder"}
    for f in dataclasses.fields(swin):
        if f.name not in swin_only:
            assert getattr(vit, f.name) == getattr(swin, f.name), f.name


def test_descriptor_rhythm_skip_levels_hides_the_coarse_levels_from_the_rhythm_features_only(tiny_cache: Path) -> None:
    """descriptor_rhythm_skip_levels=k: the rhythm features are predicted from the levels but
    the k coarsest (no gradient reaches those levels from them), every other feature from all
    levels; a k under descriptor_skip_levels or past the last level is a config error."""
    model, x = _descriptor_model(tiny_cache, "objective.descriptor_weight=1", "objective.descriptor_rhythm_skip_levels=1")
    head = model.descriptor_head
    out = model.encoder(x)
    loss = head.loss(out, x)  # the first batch: standardised by its own statistics

    feats = torch.cat([lvl.pooled() for lvl in out.patches], -1)  # (B, D), coarsest level first
    d0 = out.patches[0].dim
    z = _standardised(descriptors(x), head)  # (B, F)
    rhythm = torch.tensor(RHYTHM)
    rest = torch.tensor([i for i in range(len(DESCRIPTOR_NAMES)) if i not in RHYTHM])
    w, b = head.linear.weight, head.linear.bias
    err_rest = (feats @ w[rest].T + b[rest] - z[:, rest]) ** 2  # (B, F - 48): from every level
    err_rhythm = (feats[:, d0:] @ w[rhythm, d0:].T + b[rhythm] - z[:, rhythm]) ** 2  # (B, 48): level 0 hidden
    assert torch.allclose(loss, (err_rest.sum() + err_rhythm.sum()) / z.numel(), atol=1e-5)

    # level 0's tokens get the gradient of the other features' errors alone
    coarse = out.patches[0].emb
    grad = torch.autograd.grad(loss, coarse, retain_graph=True)[0]
    grad_rest = torch.autograd.grad(err_rest.sum() / z.numel(), coarse)[0]
    assert grad.abs().sum() > 0 and torch.allclose(grad, grad_rest, atol=1e-7)
    assert not any("weight_mask" in k for k in model.state_dict())

    for bad in (["objective.descriptor_skip_levels=2", "objective.descriptor_rhythm_skip_levels=1"],
                ["objective.descriptor_rhythm_skip_levels=9"]):
        with pytest.raises(ConfigError, match="descriptor_rhythm_skip_levels must leave the rhythm descriptors a level"):
            load_config(None, [*SMALL, "objective.descriptor_weight=1", *bad])


@pytest.mark.parametrize("kind", ["transformer", "autocorr"])
def test_time_stage_objective_trains_the_stage_alone(tiny_cache: Path, kind: str) -> None:
    """model.time_stage_dim: the time head regresses the whole crop's standardised descriptors
    from the mean of the stage's tokens (the autocorrelation stage's one token), rhythm features
    weighted time_stage_rhythm_weight; the term adds to the loss with weight 1 and its gradient
    reaches the stage and its head, not the pyramid."""
    model, x = _descriptor_model(tiny_cache, "model.time_stage_dim=16", "model.time_stage_heads=2",
                                 f"model.time_stage_kind={kind}", "objective.time_stage_rhythm_weight=3")
    head = model.time_head
    torch.manual_seed(0)
    loss, parts = model({"x": x})
    assert set(parts) == {"recon", "time_stage"} and torch.allclose(loss, parts["recon"] + parts["time_stage"])
    torch.manual_seed(0)
    out = model.encoder(x, mask_ratio=model.objective.mask_ratio)
    err = (head.linear(out.time.emb.mean(1)) - _standardised(descriptors(x), head)) ** 2  # (B, F)
    weight = torch.ones(len(DESCRIPTOR_NAMES))
    weight[RHYTHM] = 3
    assert torch.allclose(parts["time_stage"], (err * weight).mean(), atol=1e-5)
    parts["time_stage"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(n.startswith(("encoder.time_stage.", "time_head.")) for n in grads)
    assert any(n.startswith("time_head.") for n in grads) and any(n.startswith("encoder.time_stage.") for n in grads)
