import math

import pytest
import torch

from midi_rae.layers import (PatchEmbed, PatchExpand, PatchMerging, SwinBlock, SwinStage, WindowAttention, clamp_window,
                             log_spaced_relative_coords, resize_relative_position_bias_table, window_attention_mask,
                             window_partition, window_reverse)


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere (zero-initialised post-norms would hide attention)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("logit_scale"):
                p.fill_(math.log(10))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))


@pytest.mark.parametrize("grid,window", [((8, 8), (4, 4)), ((8, 16), (8, 8)), ((4, 6), (2, 3))])
def test_window_partition_round_trip(grid, window) -> None:
    x = torch.randn(2, *grid, 5)
    w = window_partition(x, window)
    assert w.shape == (2 * (grid[0] // window[0]) * (grid[1] // window[1]), *window, 5)
    torch.testing.assert_close(window_reverse(w, window, grid), x)
    # the first window holds the top-left block of the first sample
    torch.testing.assert_close(w[0], x[0, : window[0], : window[1]])


def test_clamp_window_per_axis() -> None:
    assert clamp_window((8, 16), (8, 8), (4, 4)) == ((8, 8), (0, 4))
    assert clamp_window((1, 2), (8, 8), (4, 4)) == ((1, 2), (0, 0))
    assert clamp_window((32, 32), (8, 8), (4, 4)) == ((8, 8), (4, 4))


def test_shift_mask_is_hard_and_keeps_self() -> None:
    mask = window_attention_mask((16, 16), (8, 8), (4, 4))
    assert mask.shape == (4, 64, 64)
    assert set(mask.unique().tolist()) == {0.0, float("-inf")}
    assert (mask.diagonal(dim1=1, dim2=2) == 0).all()
    assert (mask[0] == 0).all()  # the top-left window has no wrapped tokens
    assert window_attention_mask((16, 16), (8, 8), (0, 0)) is None


def test_padding_keys_are_masked_for_real_queries() -> None:
    mask = window_attention_mask((6, 6), (4, 4), (0, 0))  # padded to 8 x 8
    labels = torch.zeros(8, 8)
    labels[6:, :] = labels[:, 6:] = 1  # padding
    win = window_partition(labels[None, :, :, None], (4, 4)).flatten(1)  # (nW, N)
    real_q, pad_k = win[:, :, None] == 0, win[:, None, :] == 1
    assert (mask[(real_q & pad_k).expand_as(mask)] == float("-inf")).all()
    assert (mask.diagonal(dim1=1, dim2=2) == 0).all()


def test_non_divisible_grid_runs_finite() -> None:
    block = SwinBlock(8, (6, 10), 2, window_size=(4, 4), shift_size=(2, 2))
    randomize(block)
    x = torch.randn(2, 6, 10, 8, requires_grad=True)
    y = block(x)
    y.square().sum().backward()
    assert y.shape == x.shape and torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_one_by_one_window_is_finite() -> None:
    assert torch.isfinite(log_spaced_relative_coords((1, 1))).all()
    stage = SwinStage(8, 16, (2, 2), depth=2, num_heads=2, window_size=(8, 8), downsample=True)
    randomize(stage)
    y = stage(torch.randn(3, 2, 2, 8))
    assert y.shape == (3, 1, 1, 16) and torch.isfinite(y).all()


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("train", [False, True])
def test_sdpa_matches_math_path(version: int, train: bool) -> None:
    stage = SwinStage(16, 16, (16, 16), depth=2, num_heads=2, window_size=(8, 8), version=version)
    randomize(stage)
    stage.train(train)
    x = torch.randn(2, 16, 16, 16)
    outs, grads = [], []
    for fused in (True, False):
        for blk in stage.blocks:
            blk.attn.fused = fused
        xi = x.clone().requires_grad_(True)
        y = stage(xi)
        y.square().mean().backward()
        outs.append(y.detach())
        grads.append(xi.grad)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)


def test_position_bias_cached_in_eval_recomputed_in_training() -> None:
    attn = WindowAttention(8, (4, 4), 2)
    x = torch.randn(3, 16, 8)
    attn.eval()
    with torch.no_grad():
        attn(x)
        first = dict(attn._mask_cache)
        attn(x)
    assert len(first) == 1 and all(attn._mask_cache[k] is v for k, v in first.items())  # reused, not rebuilt
    attn.train()
    assert not attn._mask_cache
    y = attn(x)
    y.sum().backward()
    assert not attn._mask_cache and attn.cpb_mlp[0].weight.grad is not None  # learned each step
    attn.eval()
    with torch.no_grad():
        before = attn(x)
        new = {k: v + 0.5 if k.startswith("cpb_mlp") else v for k, v in attn.state_dict().items()}
        attn.load_state_dict(new)  # a loaded bias must not be served from a stale cache
        after = attn(x)
    assert not torch.allclose(before, after)


def test_position_bias_cache_is_keyed_by_dtype() -> None:
    # A V2 bias cached under bf16 autocast (its CPB MLP ran in bf16) must not serve an fp32 pass.
    torch.manual_seed(0)
    attn = WindowAttention(8, (4, 4), 2).eval()
    x = torch.randn(3, 16, 8)
    with torch.no_grad():
        fresh = attn(x)
        attn.clear_cache()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            attn(x)
        after_bf16 = attn(x)
    torch.testing.assert_close(after_bf16, fresh, atol=0, rtol=0)


def test_patch_merging_and_expand_shapes() -> None:
    x = torch.randn(2, 8, 16, 6)
    assert PatchMerging(6).forward(x).shape == (2, 4, 8, 12)
    assert PatchMerging(6, version=1).forward(x).shape == (2, 4, 8, 12)
    assert PatchExpand(6).forward(x).shape == (2, 16, 32, 3)
    with pytest.raises(ValueError, match="even grid"):
        PatchMerging(6)(torch.randn(1, 3, 4, 6))


def test_patch_expand_places_sub_tokens() -> None:
    expand = PatchExpand(4, out_dim=1, norm_layer=torch.nn.Identity)
    with torch.no_grad():
        expand.expand.weight.copy_(torch.eye(4))
    x = torch.arange(4.0).view(1, 1, 1, 4)  # one token whose 4 channels are (dh, dw) = 00, 01, 10, 11
    assert expand(x)[0, :, :, 0].tolist() == [[0.0, 1.0], [2.0, 3.0]]


@pytest.mark.parametrize("chans, patch, fold", [(1, (4, 4), False), (2, (8, 2), False), (2, (4, 4), True)])
def test_patch_embed_is_its_conv(chans: int, patch: tuple[int, int], fold: bool) -> None:
    """The patch projection (a matmul over reshaped patches) is the strided conv its weights
    belong to, in value and in every gradient."""
    embed = PatchEmbed(chans, 8, patch, norm_layer=torch.nn.Identity, fold=fold)
    randomize(embed)
    x = (torch.rand(3, chans, 32, 24) < 0.3).float().requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    ref_in = ref_x.mean(1, keepdim=True) if fold else ref_x
    ref = torch.nn.functional.conv2d(ref_in, embed.proj.weight, embed.proj.bias, stride=patch).permute(0, 2, 3, 1)
    out = embed(x)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    grads = [x.grad, embed.proj.weight.grad, embed.proj.bias.grad]
    x.grad = embed.proj.weight.grad = embed.proj.bias.grad = None
    ref.backward(g)
    torch.testing.assert_close(grads, [ref_x.grad, embed.proj.weight.grad, embed.proj.bias.grad])


def test_heads_must_divide_dim() -> None:
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        WindowAttention(10, (4, 4), 3)


def test_coords_keep_the_offsets_the_mlp_was_trained_on() -> None:
    """At a larger window, the offsets of the trained window get the inputs they were trained with
    (the middle of the table), and the new ones extend past them."""
    for trained, new in [((8, 8), (16, 16)), ((8, 4), (8, 8)), ((4, 4), (2, 4))]:
        old, moved = log_spaced_relative_coords(trained), log_spaced_relative_coords(new, trained)
        assert moved.shape == (2 * new[0] - 1, 2 * new[1] - 1, 2)
        rh, rw = min(trained[0], new[0]) - 1, min(trained[1], new[1]) - 1  # offsets both windows hold
        common = lambda t, w: t[w[0] - 1 - rh: w[0] + rh, w[1] - 1 - rw: w[1] + rw]  # noqa: E731
        assert torch.equal(common(moved, new), common(old, trained))
    assert torch.equal(log_spaced_relative_coords((8, 8), (8, 8)), log_spaced_relative_coords((8, 8)))


def test_v1_table_resized_bicubically() -> None:
    table = torch.randn(15 * 7, 3)  # an (8, 4) window, 3 heads
    resized = resize_relative_position_bias_table(table, (8, 4), (16, 8))
    assert resized.shape == (31 * 15, 3)
    assert resize_relative_position_bias_table(table, (8, 4), (8, 4)) is table
    constant = torch.full((15 * 7, 3), 0.25)
    torch.testing.assert_close(resize_relative_position_bias_table(constant, (8, 4), (5, 16)),
                               torch.full((9 * 31, 3), 0.25), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not learned for a 8 x 8 window"):
        resize_relative_position_bias_table(table, (8, 8), (16, 16))
