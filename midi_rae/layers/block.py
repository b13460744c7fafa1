"""Swin Transformer block: (shifted) window attention + MLP, each with a residual."""
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import WindowAttention
from .mlp import DropPath, Mlp
from .window import clamp_window, padded_size, window_attention_mask, window_partition, window_reverse


class SwinBlock(nn.Module):
    """One Swin block on an NHWC grid of fixed size `input_resolution`.

    version=2 uses res-post-norm, x + drop_path(norm(f(x))), with the norms zero-initialised by
    the model so each block starts as the identity; version=1 uses pre-norm, x + drop_path(f(norm(x))).
    Names match timm's SwinTransformerV2Block / SwinTransformerBlock. `pretrained_window_size`:
    the window a V2 block's weights were trained at, if not `window_size` (after clamping both).
    """

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int,
                 window_size: tuple[int, int] = (8, 8), shift_size: tuple[int, int] = (0, 0),
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: Callable[[], nn.Module] = nn.GELU,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, version: int = 2,
                 pretrained_window_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        self.window_size, self.shift_size = clamp_window(self.input_resolution, tuple(window_size), tuple(shift_size))
        self.version = version
        self.attn = WindowAttention(dim, self.window_size, num_heads, qkv_bias=qkv_bias,
                                    attn_drop=attn_drop, proj_drop=proj_drop, version=version,
                                    pretrained_window_size=pretrained_window_size)
        self.norm1 = norm_layer(dim)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.norm2 = norm_layer(dim)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        # Built once: the grid is fixed, so shift and padding masks never change.
        self.register_buffer("attn_mask", window_attention_mask(self.input_resolution, self.window_size, self.shift_size),
                             persistent=False)

    def _attn(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        if (H, W) != self.input_resolution:
            raise ValueError(f"SwinBlock built for a {self.input_resolution} grid got {(H, W)}")
        sh, sw = self.shift_size
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        Hp, Wp = padded_size((H, W), self.window_size)
        if (Hp, Wp) != (H, W):
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        windows = window_partition(x, self.window_size).flatten(1, 2)  # (B*nW, N, C)
        windows = self.attn(windows, self.attn_mask)
        x = window_reverse(windows.view(-1, *self.window_size, C), self.window_size, (Hp, Wp))
        x = x[:, :H, :W]
        if sh or sw:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x

    def mix(self, x: Tensor) -> Tensor:
        """The attention half: (B, H, W, C) -> (B, H, W, C)."""
        if self.version == 2:
            return x + self.drop_path1(self.norm1(self._attn(x)))
        return x + self.drop_path1(self._attn(self.norm1(x)))

    def ffn(self, x: Tensor) -> Tensor:
        """The MLP half, token by token: (B, H, W, C) -> (B, H, W, C), or (M, C) -> (M, C) for
        any selection of tokens when the block has no drop path (which draws per sample)."""
        if self.version == 2:
            return x + self.drop_path2(self.norm2(self.mlp(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        return self.ffn(self.mix(x))
