import pytest
import torch

from midi_rae.core import EncoderOutput, HierarchicalPatchState, LevelInfo, PatchState, grid_positions
from midi_rae.layers import apply_rope
from midi_rae.vit import ViTEncoder, rope_angles, rope_freqs

SMALL = dict(embed_dim=32, depth=2, num_heads=2)


def make(h: int = 128, w: int = 256, **kw) -> ViTEncoder:
    torch.manual_seed(0)
    return ViTEncoder(h, w, **{**SMALL, **kw}).eval()


def roll(b: int, h: int = 128, w: int = 256, c: int = 1) -> torch.Tensor:
    """Sparse notes on the left half, silence on the right: both empty and non-empty patches."""
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(b, c, h, w, generator=g) > 0.9).float()
    x[..., w // 2:] = 0
    return x


def random_visible(b: int, n: int, n_vis: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    keep = torch.rand(b, n, generator=g).argsort(dim=1)[:, :n_vis]
    return torch.zeros(b, n, dtype=torch.bool).scatter(1, keep, True)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    B, C, H, W = x.shape
    return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C, p, p)


def unpatchify(t: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    B, N, C, p, _ = t.shape
    return t.reshape(B, gh, gw, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, gh * p, gw * p)


@pytest.mark.parametrize("h,w,c", [(128, 128, 1), (128, 256, 1), (128, 256, 2)])
def test_output_structure(h, w, c):
    m = make(h, w, in_chans=c)
    gh, gw = h // 16, w // 16
    out = m(roll(3, h, w, c))
    assert isinstance(out, EncoderOutput) and isinstance(out.patches, HierarchicalPatchState)
    assert out.patches.num_levels == 2 and all(isinstance(lvl, PatchState) for lvl in out.patches)
    cls, patches = out.patches
    assert cls.emb.shape == (3, 1, 32) and patches.emb.shape == (3, gh * gw, 32)
    assert torch.equal(cls.pos, torch.zeros(1, 2, dtype=torch.long))
    assert torch.equal(patches.pos, grid_positions(gh, gw)) and torch.equal(out.full_pos, patches.pos)
    assert out.mae_mask.dtype == torch.bool and out.mae_mask.all() and cls.mae_mask.all()
    assert torch.equal(out.full_non_empty, patches.non_empty) and torch.equal(out.mae_mask, patches.mae_mask)
    assert torch.equal(cls.non_empty[:, 0], patches.non_empty.any(1))
    assert torch.isfinite(patches.emb).all() and torch.isfinite(cls.emb).all()
    # aliases: the final (coarsest) level is the CLS token
    assert out.hierarchical is out.patches and out.patch_state is cls and out.latent is cls.emb
    assert out.patches.info == m.feature_info == [
        LevelInfo((1, 1), 32, (1, 1), (h, w), "cls"), LevelInfo((gh, gw), 32, (gh, gw), (16, 16), "patches")]
    moved = out.to("cpu")
    assert torch.equal(moved.latent, out.latent) and moved.patches.info == out.patches.info


def test_non_empty_threshold():
    x = torch.zeros(1, 1, 128, 128)
    x[0, 0, 5, 5] = 20 / 127  # a soft note of a velocity cache: patch (0, 0)
    x[0, 0, 20, 40] = 1.0  # patch (1, 2)
    out = ViTEncoder(128, 128, **SMALL)(x)
    expected = torch.zeros(1, 64, dtype=torch.bool)
    expected[0, 0] = expected[0, 1 * 8 + 2] = True
    assert torch.equal(out.full_non_empty, expected)


def test_mask_ratio_drops_equal_counts_and_zeros_masked():
    m = make()
    torch.manual_seed(3)
    out = m(roll(4), mask_ratio=0.5)
    N = 8 * 16
    vis = out.mae_mask
    assert (vis.sum(1) == N - round(0.5 * N)).all()
    assert (out.patches[1].emb[~vis] == 0).all() and (out.patches[1].emb[vis].abs().sum(-1) > 0).all()
    assert not all(torch.equal(vis[0], vis[i]) for i in range(1, 4))  # drawn per sample
    assert out.patches[0].mae_mask.all()


def test_given_mae_mask_used_exactly():
    m = make()
    vis = random_visible(2, 128, 40)
    out = m(roll(2), mask_ratio=0.75, mae_mask=vis.int())  # a given mask wins; 0/1 accepted
    assert out.mae_mask.dtype == torch.bool and torch.equal(out.mae_mask, vis)
    assert torch.equal(out.patches[1].mae_mask, vis)


def test_default_forward_is_unmasked_even_in_train_mode():
    m = make(mae_ratio=0.75).train()
    assert m.mae_ratio == 0.75
    assert m(roll(2)).mae_mask.all()


def test_masked_patches_do_not_influence_visible_outputs():
    m = make()
    x = roll(2)
    vis = random_visible(2, 128, 64)
    out = m(x, mae_mask=vis)
    p = patchify(x, 16)
    p[~vis] = torch.rand_like(p[~vis])  # new pixels in every masked patch only
    out2 = m(unpatchify(p, 8, 16), mae_mask=vis)
    assert torch.allclose(out.patches[1].emb, out2.patches[1].emb, atol=1e-6)
    assert torch.allclose(out.latent, out2.latent, atol=1e-6)
    p[vis] = torch.rand_like(p[vis])  # sanity: visible pixels do matter
    assert not torch.allclose(m(unpatchify(p, 8, 16), mae_mask=vis).latent, out.latent, atol=1e-4)


def test_rope_makes_encoder_position_aware():
    m = make()
    with torch.no_grad():  # at init q.k ~ 0 and attention is near uniform; sharpen it so positions show
        for blk in m.blocks:
            blk.attn.qkv.weight.normal_(std=0.3)
    x = torch.rand(1, 1, 128, 256)
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(4))
    out = m(x)
    out_perm = m(unpatchify(patchify(x, 16)[:, perm], 8, 16))
    # Without positions the encoder would be permutation-equivariant (same CLS, permuted patches).
    assert not torch.allclose(out_perm.patches[1].emb, out.patches[1].emb[:, perm], atol=1e-2)
    assert not torch.allclose(out_perm.latent, out.latent, atol=1e-2)


def test_rope_scores_depend_on_offset_only():
    hd = 16
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def score(pq, pk):
        rot = [apply_rope(t, a.cos()[:, None], a.sin()[:, None])
               for t, a in ((q, rope_angles(torch.tensor([[pq]]), rope_freqs(hd))),
                            (k, rope_angles(torch.tensor([[pk]]), rope_freqs(hd))))]
        return (rot[0] * rot[1]).sum()

    assert torch.allclose(score((2, 3), (5, 1)), score((4, 7), (7, 5)), atol=1e-5)  # same (row, col) offset
    assert not torch.allclose(score((2, 3), (5, 1)), score((2, 3), (5, 2)), atol=1e-3)  # column matters
    assert not torch.allclose(score((2, 3), (5, 1)), score((2, 3), (6, 1)), atol=1e-3)  # row matters


def test_empty_input_uses_empty_token():
    m = make()
    x = torch.zeros(2, 1, 128, 256)
    tokens, non_empty = m._embed(x)
    assert not non_empty.any() and torch.equal(tokens, m.empty_token.expand(2, 128, -1))
    out = m(x)
    assert not out.full_non_empty.any() and not out.patches[0].non_empty.any()
    (out.latent @ torch.randn(32)).sum().backward()  # not .sum(): a LayerNorm output sums to a constant
    assert m.empty_token.grad.abs().sum() > 0 and m.patch_embed.weight.grad.abs().sum() == 0


def test_gradient_reaches_every_parameter_with_masking():
    m = make().train()
    x = roll(2)
    torch.manual_seed(5)
    out = m(x, mask_ratio=0.5)
    assert out.full_non_empty.any() and not out.full_non_empty.all()
    w = torch.randn(32)
    (out.latent @ w).sum().add((out.patches[1].emb @ w).sum()).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("kw,match", [
    (dict(img_height=130), "multiple of patch_h"),
    (dict(img_width=250), "multiple of patch_w"),
    (dict(embed_dim=30, num_heads=4), "choose num_heads dividing embed_dim"),
    (dict(embed_dim=36, num_heads=2), "multiple of 4"),
    (dict(mae_ratio=1.0), "mae_ratio"),
])
def test_constructor_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        ViTEncoder(**{"img_height": 128, "img_width": 256, **SMALL, **kw})


@pytest.mark.parametrize("x,kw,match", [
    (torch.zeros(2, 128, 256), {}, "unsqueeze"),
    (torch.zeros(2, 2, 128, 256), {}, "in_chans=2"),
    (torch.zeros(2, 1, 128, 128), {}, "img_width=128"),
    (torch.zeros(2, 1, 128, 256), dict(mae_mask=torch.ones(2, 64, dtype=torch.bool)), r"\(2, 128\)"),
    (torch.zeros(2, 1, 128, 256), dict(mae_mask=torch.stack([torch.ones(128), torch.zeros(128)]).bool()),
     "same number of visible"),
    (torch.zeros(2, 1, 128, 256), dict(mask_ratio=1.0), "mask_ratio"),
    (torch.zeros(2, 1, 128, 256), dict(mask_ratio=-0.1), "mask_ratio"),
])
def test_forward_errors(x, kw, match):
    with pytest.raises(ValueError, match=match):
        make()(x, **kw)
