import pytest
import torch

from midi_rae.core import EncoderOutput, HierarchicalPatchState, PatchState, grid_positions
from midi_rae.losses import mep_loss, multiscale_recon_loss
from midi_rae.predictor import MultiScaleReconHeads, SwinMaskedEmbeddingPredictor, level_grids, positions
from midi_rae.swin import SwinEncoder
from midi_rae.vit import ViTEncoder

GRIDS = {(128, 128): [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (32, 32)],
         (128, 256): [(1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 64)]}


def piano_roll(B: int, H: int, W: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(B, 1, H, W)
    x[:, :, 40:90] = (torch.rand(B, 1, 50, W, generator=g) > 0.9).float()
    return x


TINY = dict(embed_dim=4, depths=(1,) * 6, num_heads=(1,) * 6)  # level dims 128, 64, ..., 4
DIMS = (128, 64, 32, 16, 8, 4)


def small_mep(**kwargs) -> SwinMaskedEmbeddingPredictor:
    return SwinMaskedEmbeddingPredictor(**{"dims": DIMS, "summary_dim": 32, "heads": 2, **kwargs})


@pytest.fixture(scope="module")
def encoded() -> dict:
    """A tiny SwinEncoder per input size and its output on a batch of 2 (no encoder graph)."""
    out = {}
    for H, W in GRIDS:
        torch.manual_seed(0)
        enc = SwinEncoder(H, W, **TINY)
        with torch.no_grad():
            out[H, W] = enc, enc(piano_roll(2, H, W))
    return out


def fake_patches(B: int, grids: list[tuple[int, int]], dim: int = 1) -> HierarchicalPatchState:
    """A hierarchy with all-non-empty levels and no LevelInfo, for cheap mask statistics."""
    return HierarchicalPatchState([PatchState(torch.zeros(B, h * w, dim), grid_positions(h, w),
                                              torch.ones(B, h * w, dtype=torch.bool), torch.ones(B, h * w, dtype=torch.bool))
                                   for h, w in grids])


def test_overview_snippet_runs() -> None:
    """The test snippet at the end of spec/swin_design_overview.txt, line breaks restored,
    with the default encoder and predictor."""
    B, C, H, W = 2, 1, 128, 128
    torch.manual_seed(0)
    enc = SwinEncoder(H, W)
    enc_out = enc(piano_roll(B, H, W))
    from midi_rae.utils import param_count
    from midi_rae.losses import safe_mean
    mep = SwinMaskedEmbeddingPredictor()
    print(f"mep model parameters: {param_count(mep)[1]:,}")
    enc_out1 = enc_out  # for main code, it'll be enc_out1 that will be the target
    z1 = [lvl.emb for lvl in enc_out1.patches.levels]
    x2 = torch.randn(B, C, H, W)
    enc_out2 = enc(x2)  # for main code, it'll be enc_out2 that will get trained on
    emb_pred, masks = mep(enc_out2)  # predict from masked-input enc_out2, what the comparable embeddings are in enc_out1
    print(f"len(emb_pred) = {len(emb_pred)}; (B, N, D)")
    with torch.no_grad():  # just for testing/demo, no grads
        mep_loss_ = 0
        for lev, (emb, mask) in enumerate(zip(emb_pred, masks)):
            print(f"Level {lev}: emb.shape = {tuple(emb.shape)}, mask.shape = {mask.shape}, "
                  f"avg # visible = {mask.sum()/B:.1f}, avg # masked = {(~mask).sum()/B:.1f}")
            target = enc_out1.patches[lev].emb
            mep_loss_ = mep_loss_ + safe_mean((emb[~mask] - target[~mask])**2)  # mask=0 means masked, mean across each level
        mep_loss_ = mep_loss_ / enc_out.patches.num_levels  # average over levels
    print("mep_loss = ", mep_loss_)
    assert len(emb_pred) == len(z1) == 6 and torch.isfinite(mep_loss_)
    # The package's loss gives the same number.
    assert torch.allclose(mep_loss(emb_pred, z1, masks), mep_loss_)


@pytest.mark.parametrize("size", sorted(GRIDS))
def test_shapes_masks_finite(encoded, size) -> None:
    _, enc_out = encoded[size]
    mep = small_mep()
    preds, masks = mep(enc_out)
    assert level_grids(enc_out.patches) == GRIDS[size]
    for p, m, lvl, (h, w) in zip(preds, masks, enc_out.patches, GRIDS[size], strict=True):
        assert p.shape == (2, h * w, lvl.dim) and torch.isfinite(p).all()
        assert m.shape == (2, h * w) and m.dtype == torch.bool
    assert not masks[-1].all() and masks[-1].any()  # finest level: 40% masked
    assert all(m.all() for m in mep(enc_out, mask_ratio=0.0)[1])  # mask_ratio overrides self.mask_ratio


def test_grids_from_positions_without_info(encoded) -> None:
    _, enc_out = encoded[128, 256]
    bare = EncoderOutput(HierarchicalPatchState(enc_out.patches.levels), enc_out.full_pos,
                         enc_out.full_non_empty, enc_out.mae_mask)
    assert level_grids(bare.patches) == GRIDS[128, 256]
    torch.manual_seed(1)
    mep = small_mep()
    masks = [torch.ones_like(lvl.non_empty) for lvl in enc_out.patches]
    assert torch.equal(mep(enc_out, masks=masks)[0][-1], mep(bare, masks=masks)[0][-1])


def test_level_mask_ratios() -> None:
    mep = small_mep(mask_ratio=0.4, level_mask_scale=1.25)
    assert mep.level_mask_ratios() == pytest.approx([0.4 / 1.25**k for k in (5, 4, 3, 2, 1, 0)])
    torch.manual_seed(0)
    masks = mep.draw_masks(fake_patches(400, GRIDS[128, 128]))
    for m, r in zip(masks, mep.level_mask_ratios()):
        assert (~m).float().mean().item() == pytest.approx(r, abs=0.03)  # expected fraction on every grid
        assert not torch.equal(m[0], m[1]) or m.shape[1] == 1  # drawn per sample
    tuple_scale = small_mep(mask_ratio=0.5, level_mask_scale=(0, 0.2, 0.4, 0.6, 0.8, 1.0))
    assert tuple_scale.level_mask_ratios() == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    assert tuple_scale.draw_masks(fake_patches(8, GRIDS[128, 128]))[0].all()  # scale 0: never masked
    with pytest.raises(ValueError, match="each must be in"):
        SwinMaskedEmbeddingPredictor(mask_ratio=0.9, level_mask_scale=(1, 1, 1, 1, 1, 1.2))
    with pytest.raises(ValueError, match="one entry per level"):
        SwinMaskedEmbeddingPredictor(level_mask_scale=(1.0, 1.0))


def test_single_position_level_is_masked_with_its_probability(encoded) -> None:
    """A 1x1 level is masked per sample with probability = its ratio (not round(ratio) = never)."""
    mep = small_mep(mask_ratio=0.3, level_mask_scale=1.0)
    torch.manual_seed(0)
    top = mep.draw_masks(fake_patches(2000, [(1, 1)] * 6))[0]  # (2000, 1)
    assert (~top).float().mean().item() == pytest.approx(0.3, abs=0.04)
    # Fully masked, the global token is predicted from the other levels: finite, and blind to its own value.
    _, enc_out = encoded[128, 128]
    masks = [torch.ones_like(lvl.non_empty) for lvl in enc_out.patches]
    masks[0] = torch.zeros_like(masks[0])
    pred = mep(enc_out, masks=masks)[0][0]
    enc_out.patches[0].emb.add_(100.0)
    try:
        assert torch.isfinite(pred).all() and torch.allclose(mep(enc_out, masks=masks)[0][0], pred)
    finally:
        enc_out.patches[0].emb.sub_(100.0)


def test_masked_content_is_hidden(encoded) -> None:
    _, enc_out = encoded[128, 256]
    mep = small_mep()
    torch.manual_seed(3)
    masks = mep.draw_masks(enc_out.patches)
    preds = mep(enc_out, masks=masks)[0]
    poked = [torch.where(m[..., None], lvl.emb, torch.randn_like(lvl.emb)) for lvl, m in zip(enc_out.patches, masks)]
    hps = HierarchicalPatchState([PatchState(e, l.pos, l.non_empty, l.mae_mask) for e, l in zip(poked, enc_out.patches)],
                                 enc_out.patches.info)
    poked_preds = mep(EncoderOutput(hps, enc_out.full_pos, enc_out.full_non_empty, enc_out.mae_mask), masks=masks)[0]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(preds, poked_preds))


def test_gradients_reach_every_parameter(encoded) -> None:
    _, enc_out = encoded[128, 128]
    mep = small_mep()
    masks = [torch.ones_like(lvl.non_empty) for lvl in enc_out.patches]
    for m in masks:
        m[0, 0] = False  # one masked position per level, the 1x1 one included
    preds, _ = mep(enc_out, masks=masks)
    targets = [torch.randn_like(p) for p in preds]
    mep_loss(preds, targets, [torch.zeros_like(m) for m in masks]).backward()  # loss on every position
    # A level of one token: the summarizer's softmax over one key is 1 whatever the query, so its
    # norm1 (which feeds only the query) has no gradient in exact arithmetic: about 1e-14 of float
    # noise on one build, exactly 0 on another (where "> 0" failed one seed in nine).
    one_token = {f"summarizers.{i}.norm1.{w}" for i, lvl in enumerate(enc_out.patches) if lvl.emb.shape[1] == 1
                 for w in ("weight", "bias")}
    assert one_token == {"summarizers.0.norm1.weight", "summarizers.0.norm1.bias"}
    for name, p in mep.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() < 1e-9 if name in one_token else p.grad.abs().sum() > 0, name


def test_wrong_dims_message(encoded) -> None:
    _, enc_out = encoded[128, 128]
    with pytest.raises(ValueError, match=r"build it with dims=\(128, 64, 32, 16, 8, 4\)"):
        SwinMaskedEmbeddingPredictor(dims=(16, 8), summary_dim=32)(enc_out)


def test_works_with_vit_levels() -> None:
    torch.manual_seed(0)
    enc = ViTEncoder(128, 256, patch_h=16, patch_w=16, embed_dim=32, depth=1, num_heads=2)
    with torch.no_grad():
        enc_out = enc(piano_roll(2, 128, 256))
    mep = SwinMaskedEmbeddingPredictor(dims=(32, 32), summary_dim=32, mask_ratio=0.5, level_mask_scale=1.0)
    preds, masks = mep(enc_out)
    assert [tuple(p.shape) for p in preds] == [(2, 1, 32), (2, 128, 32)] and all(torch.isfinite(p).all() for p in preds)


@pytest.mark.parametrize("upsample", [1, 2])
def test_multiscale_heads(encoded, upsample) -> None:
    _, enc_out = encoded[128, 256]
    heads = MultiScaleReconHeads([lvl.dim for lvl in enc_out.patches], out_chans=2, upsample=upsample)
    logits = heads(enc_out)
    assert [tuple(lg.shape) for lg in logits] == [(2, 2, h * upsample, w * upsample) for h, w in GRIDS[128, 256]]
    roll = piano_roll(2, 128, 256).repeat(1, 2, 1, 1)
    loss = multiscale_recon_loss(logits, roll, pos_weight=torch.tensor([2.0, 3.0]))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in heads.parameters())


def test_multiscale_heads_token_layout() -> None:
    """Token n = row * cols + col lands at (row, col) of the output, on a non-square grid."""
    heads = MultiScaleReconHeads([3], out_chans=1)
    with torch.no_grad():
        heads.heads[0][0].weight.fill_(1.0), heads.heads[0][0].bias.zero_()  # norm: identity scale
        heads.heads[0][1].weight.zero_(), heads.heads[0][1].bias.zero_()
        heads.heads[0][1].weight[0, 0] = 1.0
    emb = torch.zeros(1, 6, 3)
    emb[0, 4] = torch.tensor([1.0, 0.0, 0.0])  # (row 1, col 1) of a 2 x 3 grid
    hps = HierarchicalPatchState([PatchState(emb, grid_positions(2, 3), torch.ones(1, 6, dtype=torch.bool),
                                             torch.ones(1, 6, dtype=torch.bool))])
    out = heads(EncoderOutput(hps, grid_positions(2, 3), hps[0].non_empty, hps[0].mae_mask))[0]
    assert out.shape == (1, 1, 2, 3) and out[0, 0].argmax().item() == 4


def test_predictor_checkpoints_with_separate_q_and_kv_still_load(encoded: dict) -> None:
    """Before the ViT and the predictor shared one `Attention`, the predictor's held `q` and `kv`
    projections: such a state dict loads into the fused `qkv` and predicts the same."""
    _, enc_out = encoded[128, 128]
    torch.manual_seed(0)
    mep = small_mep().eval()
    old = {}
    for k, v in mep.state_dict().items():
        if ".attn.qkv." in k:
            C = v.shape[0] // 3
            old[k.replace(".qkv.", ".q.")], old[k.replace(".qkv.", ".kv.")] = v[:C], v[C:]
        else:
            old[k] = v
    assert any(".attn.kv." in k for k in old)
    loaded = small_mep().eval()
    loaded.load_state_dict(old)
    with torch.no_grad():
        torch.manual_seed(1)
        want, _ = mep(enc_out)
        torch.manual_seed(1)
        got, _ = loaded(enc_out)
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_predictions_at_a_subset_equal_the_full_ones(encoded) -> None:
    _, enc_out = encoded[128, 256]
    torch.manual_seed(0)
    mep = small_mep()
    masks = mep.draw_masks(enc_out.patches)
    full, _ = mep(enc_out, masks=masks)
    at, valid = zip(*(positions(~m) for m in masks))  # the masked positions, padded per sample
    sub, _ = mep(enc_out, masks=masks, at=at)
    for f, s, idx, v in zip(full, sub, at, valid, strict=True):
        assert s.shape == (*idx.shape, f.shape[-1])
        gathered = f.gather(1, idx[..., None].expand(-1, -1, f.shape[-1]))
        torch.testing.assert_close(s[v], gathered[v], rtol=1e-5, atol=1e-6)
    assert valid[-1].any()  # the finest level: 40% masked


def test_positions_lists_the_selected_in_order() -> None:
    select = torch.tensor([[False, True, False, True], [True, False, False, False], [False] * 4])
    index, valid = positions(select)
    assert index.tolist() == [[1, 3], [0, 0], [0, 0]] and valid.tolist() == [[True, True], [True, False], [False, False]]
