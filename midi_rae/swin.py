"""Swin Transformer V2 models for piano rolls.

`SwinEncoder` is a drop-in replacement for `ViTEncoder`: same constructor vocabulary, same
`forward(x, mask_ratio, mae_mask) -> EncoderOutput`. Instead of one flat grid it returns a
pyramid, coarsest first: with the defaults a 128 x 128 roll gives grids 1x1, 2x2, ..., 32x32.
"""
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .core import EncoderOutput, HierarchicalPatchState, LevelInfo, PatchState, grid_positions
from .layers import PatchEmbed, SwinStage
from .masking import apply_mask_token, check_mask, patch_non_empty, pool_mask, simmim_mask
from .utils import check_roll


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


class SwinEncoder(nn.Module):
    """Swin Transformer V2 encoder (https://arxiv.org/abs/2111.09883) for (B, C, H, W) piano rolls.

    Patch embedding, empty-patch token, SimMIM masking (masked patches get a learned token and
    the grid stays whole, so windowed attention runs unchanged), then one stage per entry of
    `depths`, each halving the grid (except the first) and doubling the width. Every stage's
    output is a level of the returned hierarchy.

    `mae_ratio` is the masking ratio for pretraining, read by the training engine and passed as
    `mask_ratio`; `forward` masks only what `mask_ratio` / `mae_mask` ask, so evaluation is never
    masked by accident. `squash_coarse` overwrites empty positions at every level with a learned
    per-level empty token. `version=1` builds Swin V1 blocks instead.
    """

    def __init__(self, img_height: int, img_width: int, patch_h: int = 4, patch_w: int = 4, in_chans: int = 1,
                 embed_dim: int = 8, depths: Sequence[int] = (1, 2, 2, 6, 2, 1),
                 num_heads: Sequence[int] = (1, 1, 2, 4, 8, 16), window_size: int | Sequence[int] = 8,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, mae_ratio: float = 0.0,
                 empty_mask_ratio: float = 0.05, squash_coarse: bool = False, version: int = 2) -> None:
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        _validate(img_height, img_width, patch_h, patch_w, embed_dim, depths, num_heads, mae_ratio, version)
        self.img_size, self.patch_size, self.in_chans = (img_height, img_width), (patch_h, patch_w), in_chans
        self.mae_ratio, self.empty_mask_ratio, self.squash_coarse = mae_ratio, empty_mask_ratio, squash_coarse
        self.grid_size = (img_height // patch_h, img_width // patch_w)
        self.num_stages = len(depths)

        self.patch_embed = PatchEmbed(in_chans, embed_dim, self.patch_size, norm_layer)
        self.pos_drop = nn.Dropout(drop_rate)
        self.empty_token = nn.Parameter(torch.zeros(embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(embed_dim))

        dims = [embed_dim * 2**i for i in range(self.num_stages)]
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # stochastic depth rises over all blocks
        self.stages = nn.ModuleList()
        info = []
        grid = self.grid_size
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            stage = SwinStage(dims[max(i - 1, 0)], dims[i], grid, depth, heads, _pair(window_size),
                              downsample=i > 0, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                              attn_drop=attn_drop_rate, drop_path=dpr[sum(depths[:i]):sum(depths[: i + 1])],
                              norm_layer=norm_layer, version=version)
            grid = stage.output_resolution
            info.append(LevelInfo(grid, dims[i], stage.blocks[0].window_size, (patch_h * 2**i, patch_w * 2**i), f"stages.{i}"))
            self.stages.append(stage)
        self.norm = norm_layer(dims[-1])
        self.level_empty_tokens = nn.ParameterList([nn.Parameter(torch.zeros(d)) for d in dims]) if squash_coarse else None
        self.feature_info = info[::-1]  # coarsest first, like the output levels
        self._init_weights(version)

    def _init_weights(self, version: int) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        tokens = [self.empty_token, self.mask_token, *(self.level_empty_tokens or [])]
        for t in tokens:
            nn.init.normal_(t, std=0.02)
        if version == 2:
            # Res-post-norm: zero-initialised norms make every block start as the identity (Swin V2).
            for stage in self.stages:
                for blk in stage.blocks:
                    for norm in (blk.norm1, blk.norm2):
                        nn.init.zeros_(norm.weight)
                        nn.init.zeros_(norm.bias)

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Patch tokens with empty patches replaced: (B, gh, gw, D) and non_empty (B, gh, gw)."""
        non_empty = patch_non_empty(x, self.patch_size)
        tokens = apply_mask_token(self.patch_embed(x), non_empty, self.empty_token)
        return self.pos_drop(tokens), non_empty

    def make_mask(self, non_empty: Tensor, mask_ratio: float, mae_mask: Tensor | None) -> Tensor:
        """(B, gh, gw) visibility: the given mask as is, else SimMIM per sample, else all visible."""
        B, gh, gw = non_empty.shape
        if mae_mask is not None:
            return check_mask(mae_mask, B, gh * gw, non_empty.device).view(B, gh, gw)
        if mask_ratio > 0:
            return simmim_mask(non_empty.flatten(1), mask_ratio, self.empty_mask_ratio).view(B, gh, gw)
        return torch.ones_like(non_empty)

    def run_stages(self, x: Tensor, non_empty: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """NHWC features and non_empty grids of every stage, finest first."""
        feats, empties = [], []
        for i, stage in enumerate(self.stages):
            if i > 0:
                non_empty = pool_mask(non_empty, any_of=True)
            x = stage(x)
            if i == self.num_stages - 1:
                x = self.norm(x)
            if self.level_empty_tokens is not None:
                x = apply_mask_token(x, non_empty, self.level_empty_tokens[i])
            feats.append(x)
            empties.append(non_empty)
        return feats, empties

    def forward(self, x: Tensor, mask_ratio: float = 0.0, mae_mask: Tensor | None = None) -> EncoderOutput:
        """x: (B, C, H, W) in [0, 1]; mae_mask: optional (B, N) bool over the patch grid, True = visible."""
        check_roll(x, self.in_chans, self.img_size, type(self).__name__)
        tokens, non_empty = self.embed(x)
        visible = self.make_mask(non_empty, mask_ratio, mae_mask)
        tokens = apply_mask_token(tokens, visible, self.mask_token)
        feats, empties = self.run_stages(tokens, non_empty)
        return self._package(feats, empties, visible)

    def _package(self, feats: list[Tensor], empties: list[Tensor], visible: Tensor) -> EncoderOutput:
        """Finest-first NHWC features -> EncoderOutput, coarsest first. A coarse token counts as
        visible only when every patch under it was visible."""
        levels = []
        for i, (f, ne) in enumerate(zip(feats, empties)):
            if i > 0:
                visible = pool_mask(visible, any_of=False)
            B, h, w, D = f.shape
            levels.append(PatchState(f.reshape(B, h * w, D), grid_positions(h, w, f.device),
                                     ne.reshape(B, h * w), visible.reshape(B, h * w)))
        finest = levels[0]
        hps = HierarchicalPatchState(levels[::-1], self.feature_info)
        return EncoderOutput(hps, finest.pos, finest.non_empty, finest.mae_mask)


def _validate(img_height: int, img_width: int, patch_h: int, patch_w: int, embed_dim: int,
              depths: tuple[int, ...], num_heads: tuple[int, ...], mae_ratio: float, version: int) -> None:
    if not depths or len(depths) != len(num_heads):
        raise ValueError(f"depths {depths} and num_heads {num_heads} need one entry per stage, the same number")
    if any(d < 1 for d in depths):
        raise ValueError(f"every stage needs at least one block, got depths {depths}")
    factor = 2 ** (len(depths) - 1)
    for name, size, patch, pname in (("img_height", img_height, patch_h, "patch_h"), ("img_width", img_width, patch_w, "patch_w")):
        if size % (patch * factor):
            raise ValueError(f"{name}={size} must be divisible by {pname} * 2**(stages-1) = {patch} * {factor} = "
                             f"{patch * factor} so that every one of the {len(depths)} stages halves a whole grid; "
                             f"use {name}={max(patch * factor, round(size / (patch * factor)) * patch * factor)} "
                             f"or fewer stages")
    for i, heads in enumerate(num_heads):
        dim = embed_dim * 2**i
        if dim % heads:
            raise ValueError(f"stage {i} has width embed_dim * 2**{i} = {dim}, not divisible by num_heads[{i}] = {heads}")
    if not 0.0 <= mae_ratio < 1.0:
        raise ValueError(f"mae_ratio must be in [0, 1), got {mae_ratio}")
    if version not in (1, 2):
        raise ValueError(f"version must be 1 (Swin V1 blocks) or 2 (Swin V2 blocks), got {version}")
