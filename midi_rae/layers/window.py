"""Window partitioning and the masks of shifted-window attention.

All tensors here are NHWC: `(B, H, W, C)`. A window is `(wh, ww)` tokens.
"""
import torch
from torch import Tensor


def window_partition(x: Tensor, window_size: tuple[int, int]) -> Tensor:
    """(B, H, W, C) -> (B * nW, wh, ww, C), windows in row-major order per sample."""
    B, H, W, C = x.shape
    wh, ww = window_size
    x = x.view(B, H // wh, wh, W // ww, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh, ww, C)


def window_reverse(windows: Tensor, window_size: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """Inverse of `window_partition`: (B * nW, wh, ww, C) -> (B, H, W, C)."""
    H, W = grid
    wh, ww = window_size
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def clamp_window(grid: tuple[int, int], window_size: tuple[int, int],
                 shift_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """timm's rule, per axis: a window never exceeds the grid, and an axis that one window
    covers is not shifted (a cyclic shift there would only move tokens within the window)."""
    window = tuple(min(g, w) for g, w in zip(grid, window_size))
    shift = tuple(0 if g <= w else s for g, w, s in zip(grid, window, shift_size))
    return window, shift


def padded_size(grid: tuple[int, int], window_size: tuple[int, int]) -> tuple[int, int]:
    """Grid rounded up to a whole number of windows per axis."""
    return tuple(-(-g // w) * w for g, w in zip(grid, window_size))


def _axis_labels(n: int, n_padded: int, shift: int) -> Tensor:
    """Per position of one axis of the rolled, padded grid: 0 = in place, 1 = wrapped around
    by the cyclic shift, 2 = padding. Tokens with different labels must not attend."""
    idx = torch.arange(n_padded)
    labels = torch.zeros(n_padded, dtype=torch.long)
    if shift:
        labels[(idx >= n - shift) & (idx < n)] = 1
    labels[idx >= n] = 2
    return labels


def window_attention_mask(grid: tuple[int, int], window_size: tuple[int, int],
                          shift_size: tuple[int, int]) -> Tensor | None:
    """Additive mask (nW, N, N) with 0 where a query may attend and -inf where it may not, or
    None when nothing needs masking (no shift, no padding). N = wh * ww.

    Unlike timm's -100, -inf is a hard mask: cosine attention logits can reach 100 plus a
    bias of up to 16, where -100 would leak. Every query keeps at least itself unmasked.
    """
    Hp, Wp = padded_size(grid, window_size)
    if not any(shift_size) and (Hp, Wp) == tuple(grid):
        return None
    rows = _axis_labels(grid[0], Hp, shift_size[0])
    cols = _axis_labels(grid[1], Wp, shift_size[1])
    labels = (rows[:, None] * 3 + cols[None, :]).float()  # (Hp, Wp) region id
    win = window_partition(labels[None, :, :, None], window_size).flatten(1)  # (nW, N)
    same = win[:, :, None] == win[:, None, :]  # (nW, N, N)
    return torch.zeros(same.shape).masked_fill_(~same, float("-inf"))
