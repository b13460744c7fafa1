import pytest
import torch

from midi_rae.masking import gather_visible, mae_mask, scatter_visible, simmim_mask


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
