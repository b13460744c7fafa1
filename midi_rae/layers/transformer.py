"""The global-attention transformer block shared by the ViT encoder and decoder and by the
masked embedding predictor: pre-norm self- or cross-attention (through SDPA), optionally with
rotary position embeddings on q and k, then an MLP. Names follow timm's `vision_transformer`
(`attn.qkv`, `attn.proj`, `norm1`, `norm2`, `mlp`)."""
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mlp import Mlp


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (B, nH, L, hd) by angles with cos, sin (B, 1, L, hd/2),
    so q.k depends on the offset between positions (RoFormer, https://arxiv.org/abs/2104.09864)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, nH, L, hd/2) each
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, nH, L, hd/2, 2)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Multi-head attention of queries `x` (B, Nq, C) over `ctx` (B, Nk, C), self-attention when
    ctx is None. One `qkv` projection either way (queries from its first third, keys and values
    from the rest), so self- and cross-attention blocks share a layout. `rope`: (cos, sin) of
    shape (B, 1, N, hd/2), rotating q and k (self-attention only, where both share positions)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}; choose a head count dividing it")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # Predictor checkpoints written before this class served both kinds hold `q` and `kv`.
        if prefix + "q.weight" in state_dict and prefix + "qkv.weight" not in state_dict:
            for kind in ("weight", "bias"):
                if prefix + f"q.{kind}" in state_dict:
                    state_dict[prefix + f"qkv.{kind}"] = torch.cat([state_dict.pop(prefix + f"q.{kind}"),
                                                                   state_dict.pop(prefix + f"kv.{kind}")])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor, ctx: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        B, Nq, C = x.shape
        h = self.num_heads
        if ctx is None:
            q, k, v = self.qkv(x).reshape(B, Nq, 3, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, hd) each
        else:
            if rope is not None:
                raise ValueError("rope applies to self-attention only (queries and keys at the same positions)")
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x, w[:C], None if b is None else b[:C]).view(B, Nq, h, C // h).transpose(1, 2)  # (B, h, Nq, hd)
            kv = F.linear(ctx, w[C:], None if b is None else b[C:])  # (B, Nk, 2C)
            k, v = kv.view(B, ctx.shape[1], 2, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, Nk, hd) each
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, Nq, hd)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, Nq, C)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)[, norm_ctx(ctx)]), then x + mlp(norm2(x)).
    `cross`: attend over a context (its own LayerNorm, `norm_ctx`) instead of x itself."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 cross: bool = False, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.norm_ctx = norm_layer(dim) if cross else None
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=drop)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: Tensor, ctx: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(B, N, C) [, (B, Nk, C)] -> (B, N, C)."""
        x = x + self.attn(self.norm1(x), None if self.norm_ctx is None else self.norm_ctx(ctx), rope)
        return x + self.mlp(self.norm2(x))
