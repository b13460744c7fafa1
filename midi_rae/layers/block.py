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
        # None: windows of equal tokens computed once on the CPU (`_sparse_forward`); True / False forces.
        self.sparse: bool | None = None
        # Below this share of constant windows the gathers cost about what they save (bench_sparse.py --sweep).
        self.sparse_min_share = 0.25
        # Built once: the grid is fixed, so shift and padding masks never change.
        self.register_buffer("attn_mask", window_attention_mask(self.input_resolution, self.window_size, self.shift_size),
                             persistent=False)

    def _windows(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B*nW, N, C): shifted, padded to whole windows, partitioned."""
        B, H, W, C = x.shape
        if (H, W) != self.input_resolution:
            raise ValueError(f"SwinBlock built for a {self.input_resolution} grid got {(H, W)}")
        sh, sw = self.shift_size
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        Hp, Wp = padded_size((H, W), self.window_size)
        if (Hp, Wp) != (H, W):
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        return window_partition(x, self.window_size).flatten(1, 2)

    def _grid(self, windows: Tensor) -> Tensor:
        """Inverse of `_windows`: (B*nW, N, C) -> (B, H, W, C)."""
        (H, W), C = self.input_resolution, windows.shape[-1]
        x = window_reverse(windows.view(-1, *self.window_size, C), self.window_size, padded_size((H, W), self.window_size))
        x = x[:, :H, :W]
        sh, sw = self.shift_size
        if sh or sw:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x

    def mix(self, x: Tensor, windows: Tensor | None = None) -> Tensor:
        """The attention half: (B, H, W, C) -> (B, H, W, C). `windows`: V2's attention input
        `_windows(x)`, when the caller has it already (V1 attends over its normed input)."""
        if self.version == 2:
            windows = self._windows(x) if windows is None else windows
            return x + self.drop_path1(self.norm1(self._grid(self.attn(windows, self.attn_mask))))
        return x + self.drop_path1(self._grid(self.attn(self._windows(self.norm1(x)), self.attn_mask)))

    def ffn(self, x: Tensor) -> Tensor:
        """The MLP half, token by token: (B, H, W, C) -> (B, H, W, C), or (M, C) -> (M, C) for
        any selection of tokens when the block has no drop path (which draws per sample)."""
        if self.version == 2:
            return x + self.drop_path2(self.norm2(self.mlp(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        if self._sparse_ok(x):
            return self._sparse_forward(x)
        return self.ffn(self.mix(x))

    def _sparse_ok(self, x: Tensor) -> bool:
        """Whether the constant-window path may run: it is exact only without dropout and drop
        path while training (they draw per token or per sample), it needs data-dependent shapes
        (not under torch.compile), and its count of constant windows is a host sync (so by
        default CPU only, where there is no device to wait for)."""
        if self.sparse is False or torch.compiler.is_compiling():
            return False
        if self.training and (self.attn.attn_drop > 0 or self.attn.proj_drop.p > 0 or isinstance(self.drop_path1, DropPath)):
            return False
        return self.sparse is True or x.device.type == "cpu"

    def _sparse_forward(self, x: Tensor) -> Tensor:
        """The block, with every window whose tokens are all equal (the empty-patch token over
        silence, and what such windows become block after block) computed as one token: attention
        averages values that are all equal, whatever its weights, and the rest of the block works
        token by token. Exact up to float rounding, gradients included. The other windows run as
        in `mix` + `ffn`; under `sparse_min_share` constant windows, the whole grid does."""
        win = self._windows(x)  # (B*nW, N, C)
        # A window constant in its first channel may be constant; a tenth of the full comparison, and
        # in masked pretraining, where mask tokens land in most windows, usually the end of it.
        if int((win[..., 0] == win[:, :1, 0]).all(1).sum()) < self.sparse_min_share * len(win):
            return self.ffn(self.mix(x, win))
        const = (win == win[:, :1]).flatten(1).all(1)  # (B*nW,)
        n_const = int(const.sum())
        # With every window constant, the position bias and the query / key weights would drop out
        # of the graph and get no gradient at all (not a zero one, which an optimizer treats apart).
        if n_const < self.sparse_min_share * len(win) or (n_const == len(win) and torch.is_grad_enabled()):
            return self.ffn(self.mix(x, win))
        nW = self.attn_mask.shape[0] if self.attn_mask is not None else 1
        out = torch.empty_like(win)
        rows = (~const).nonzero().squeeze(1)  # (M,) windows that hold different tokens
        if len(rows):
            w = win[rows]  # (M, N, C)
            out = out.index_copy(0, rows, self._tokens(w, self.attn(w if self.version == 2 else self.norm1(w),
                                                                    self.attn_mask, rows % nW)))
        rows = const.nonzero().squeeze(1)  # (K,) windows of one token repeated
        t = win[rows, 0]  # (K, C)
        a = self.attn.constant(t if self.version == 2 else self.norm1(t))
        out = out.index_copy(0, rows, self._tokens(t, a)[:, None].expand(-1, win.shape[1], -1))
        return self._grid(out)

    def _tokens(self, x: Tensor, a: Tensor) -> Tensor:
        """The rest of the block, token by token, from its input `x` and the attention output `a`."""
        x = x + self.norm1(a) if self.version == 2 else x + a
        return self.ffn(x)
