import pytest
import torch
import torch.nn.functional as F

from midi_rae.masking import gather_visible, mae_mask, patch_non_empty, pool_mask, scatter_visible, simmim_mask
from midi_rae.swin import SwinEncoder
from midi_rae.vit import ViTEncoder


def content(B: int = 4, N: int = 64) -> torch.Tensor:
    torch.manual_seed(0)
    non_empty = torch.zeros(B, N, dtype=torch.bool)
    non_empty[:, : N // 2] = True
    return non_empty


def test_simmim_masks_each_group_at_its_rate() -> None:
    non_empty = content()
    visible = simmim_mask(non_empty, 0.5, empty_mask_ratio=0.25)
    assert visible.dtype == torch.bool and visible.shape == non_empty.shape
    assert ((~visible) & non_empty).sum(1).tolist() == [16] * 4  # 0.5 * 32 non-empty
    assert ((~visible) & ~non_empty).sum(1).tolist() == [4] * 4  # 0.5 * 0.25 * 32 empty
    assert not torch.equal(visible[0], visible[1])  # drawn per sample


def test_zero_ratio_masks_nothing() -> None:
    assert simmim_mask(content(), 0.0).all()
    assert mae_mask(content(), 0.0).all()


def test_mae_mask_equal_counts_and_prefers_non_empty() -> None:
    non_empty = content(B=64)
    visible = mae_mask(non_empty, 0.25, empty_mask_ratio=0.05)
    assert (~visible).sum(1).tolist() == [16] * 64
    masked_empty = ((~visible) & ~non_empty).float().mean()
    masked_full = ((~visible) & non_empty).float().mean()
    assert masked_empty < 0.2 * masked_full


def test_bad_ratio_message() -> None:
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        simmim_mask(content(), 1.0)


def test_gather_scatter_round_trip() -> None:
    x = torch.randn(4, 64, 3)
    visible = mae_mask(content(), 0.5)
    xv = gather_visible(x, visible)
    assert xv.shape == (4, 32, 3)
    back = scatter_visible(xv, visible)
    torch.testing.assert_close(back[visible], x[visible])
    assert (back[~visible] == 0).all()


def test_gather_needs_equal_counts() -> None:
    visible = torch.ones(2, 4, dtype=torch.bool)
    visible[0, 0] = False
    with pytest.raises(ValueError, match="same number of visible"):
        gather_visible(torch.zeros(2, 4, 1), visible)


def test_low_velocity_patch_is_non_empty() -> None:
    # A velocity cache scales velocity to v / 127: a soft note (velocity 20) is still a note,
    # so the encoders must embed it rather than replace it by the empty token.
    x = torch.zeros(1, 1, 32, 32)
    x[0, 0, 2, 3] = 20 / 127  # inside patch (0, 0) of 8 x 8 patches
    expected = torch.zeros(1, 4, 4, dtype=torch.bool)
    expected[0, 0, 0] = True
    assert torch.equal(patch_non_empty(x, (8, 8)), expected)
    swin = SwinEncoder(32, 32, patch_h=8, patch_w=8, depths=(1, 1), num_heads=(1, 1), window_size=4).eval()
    vit = ViTEncoder(32, 32, patch_h=8, patch_w=8, embed_dim=16, num_heads=2, depth=1).eval()
    with torch.no_grad():
        for enc in (swin, vit):
            out = enc(x)
            assert torch.equal(out.full_non_empty, expected.flatten(1))
            assert not torch.allclose(out.patches.finest.emb, enc(torch.zeros_like(x)).patches.finest.emb)


@pytest.mark.parametrize("shape", [(3, 8, 6), (2, 5, 7)])
def test_pool_mask_is_2x2_max_and_min_pooling(shape: tuple[int, int, int]) -> None:
    """Any / all of each 2 x 2 cell, an odd last row or column dropped: what max pooling of the
    mask as 0 / 1 gives (and min pooling for all)."""
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.4
    m = mask.float()[:, None]
    assert torch.equal(pool_mask(mask, any_of=True), F.max_pool2d(m, 2)[:, 0].bool())
    assert torch.equal(pool_mask(mask, any_of=False), (-F.max_pool2d(-m, 2))[:, 0].bool())
