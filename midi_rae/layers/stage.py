"""A Swin stage: optional 2x downsample at its start, then `depth` blocks alternating
plain and shifted windows. Names match timm's SwinTransformerV2Stage (`downsample`, `blocks`).
`pretrained_window_size` is the window the stage's V2 blocks were trained at (after clamping to
the grid they were trained on), when they run at another."""
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .block import SwinBlock
from .patch import PatchMerging


class SwinStage(nn.Module):
    def __init__(self, dim: int, out_dim: int, input_resolution: tuple[int, int], depth: int,
                 num_heads: int, window_size: tuple[int, int] = (8, 8), downsample: bool = False,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float | Sequence[float] = 0.0,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, version: int = 2,
                 pretrained_window_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.grad_checkpointing = False  # recompute each block in the backward pass (training only)
        if not downsample and dim != out_dim:
            raise ValueError(f"a stage without downsample keeps its width: dim {dim} != out_dim {out_dim}")
        self.input_resolution = tuple(input_resolution)
        self.output_resolution = tuple(r // 2 for r in input_resolution) if downsample else self.input_resolution
        self.downsample = PatchMerging(dim, out_dim, norm_layer, version) if downsample else nn.Identity()
        drop_path = list(drop_path) if isinstance(drop_path, Sequence) else [drop_path] * depth
        window_size = tuple(window_size)
        shift = tuple(w // 2 for w in window_size)
        self.blocks = nn.ModuleList([
            SwinBlock(out_dim, self.output_resolution, num_heads, window_size,
                      shift_size=(0, 0) if i % 2 == 0 else shift, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      proj_drop=proj_drop, attn_drop=attn_drop, drop_path=drop_path[i],
                      norm_layer=norm_layer, version=version, pretrained_window_size=pretrained_window_size)
            for i in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, H', W', C'), halved and widened when downsampling."""
        x = self.downsample(x)
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            # Only the block's input is kept; its activations are recomputed (with the same drop-path
            # draws: checkpoint restores the RNG state) when the backward pass reaches it.
            x = checkpoint(blk, x, use_reentrant=False) if recompute else blk(x)
        return x
