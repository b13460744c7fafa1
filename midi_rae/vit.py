"""Plain ViT encoder with 2D rotary position embeddings: the baseline that `SwinEncoder` replaces.

Same constructor vocabulary, same `forward(x, mask_ratio, mae_mask) -> EncoderOutput`. Its
hierarchy has two levels, coarsest first: the CLS token, then the patch grid.
"""
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import EncoderOutput, HierarchicalPatchState, LevelInfo, PatchState, grid_positions
from .layers import Block, Unpatchify
from .masking import apply_mask_token, check_mask, gather_visible, mae_mask as draw_mae_mask, patch_non_empty, scatter_visible
from .utils import check_positive, check_rates, check_roll, init_linears

# Base of the rotary frequencies. Token grids are small (8 x 16 for a 128 x 256 roll in 16 x 16
# patches), so the vision value 100 (RoPE-Axial, https://arxiv.org/abs/2403.13298) is used
# rather than the language value 10000, whose low frequencies would barely turn over a grid.
ROPE_THETA = 100.0


def rope_freqs(head_dim: int) -> Tensor:
    """Rotation frequencies per axis: (head_dim // 4,). Each head's dim is split into a row half
    and a column half, each half into pairs of channels; pair i turns by pos * theta^(-i / n)."""
    n = head_dim // 4
    return ROPE_THETA ** (-torch.arange(n, dtype=torch.float32) / n)


def rope_angles(pos: Tensor, freqs: Tensor) -> Tensor:
    """Rotation angle of every channel pair: pos (B, L, 2) (row, col) -> (B, L, head_dim // 2),
    row angles for the first half of the head's dim, column angles for the second."""
    pos = pos.to(freqs.dtype)
    return torch.cat([pos[..., :1] * freqs, pos[..., 1:] * freqs], dim=-1)


class ViTEncoder(nn.Module):
    """ViT encoder of piano rolls (B, in_chans, img_height, img_width) with MAE-style masking.

    Patches of `patch_h x patch_w` pixels become tokens on a (gh, gw) grid; patches without a
    note (every pixel 0) get a learned `empty_token` instead of their embedding. Masked
    tokens are dropped before the transformer (MAE, https://arxiv.org/abs/2111.06377), so they
    cost nothing and cannot leak into visible outputs. A learned CLS token is prepended; every
    block applies 2D RoPE to q and k from each kept token's original grid position (row, col),
    so dropping tokens does not shift positions. The CLS token is not rotated (it has no place
    on the grid): its attention depends on content only.

    `mae_ratio` is only stored, as `self.mae_ratio`: the masking ratio the training engine
    passes as `mask_ratio` during pretraining. `forward` masks only what its `mask_ratio` or
    `mae_mask` arguments ask for, so evaluation with default arguments is never masked.
    `empty_mask_ratio` is how much less often empty patches are masked (see `masking.mae_mask`).

    Output levels, coarsest first: 0 = CLS (B, 1, D); 1 = patches (B, gh*gw, D), with the
    encoded visible tokens at their grid positions and zeros where masked.
    """

    def __init__(self, img_height: int, img_width: int, patch_h: int = 16, patch_w: int = 16,
                 in_chans: int = 1, embed_dim: int = 256, depth: int = 4, num_heads: int = 8,
                 mlp_ratio: float = 4.0, drop_rate: float = 0.0, mae_ratio: float = 0.0,
                 empty_mask_ratio: float = 0.05, qkv_bias: bool = True,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        check_positive(type(self).__name__, img_height=img_height, img_width=img_width, patch_h=patch_h, patch_w=patch_w,
                       in_chans=in_chans, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
        check_rates(type(self).__name__, drop_rate=drop_rate, mae_ratio=mae_ratio)
        if img_height % patch_h or img_width % patch_w:
            raise ValueError(f"image {img_height}x{img_width} is not a whole number of {patch_h}x{patch_w} patches; "
                             f"choose img_height a multiple of patch_h and img_width a multiple of patch_w")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}; choose num_heads dividing embed_dim")
        if (embed_dim // num_heads) % 4:
            raise ValueError(f"head dim embed_dim / num_heads = {embed_dim // num_heads} must be a multiple of 4: 2D RoPE "
                             f"rotates channel pairs in a row half and a column half; change embed_dim or num_heads")
        self.img_size, self.patch_size, self.in_chans = (img_height, img_width), (patch_h, patch_w), in_chans
        self.grid_size = (img_height // patch_h, img_width // patch_w)
        self.embed_dim, self.mae_ratio, self.empty_mask_ratio = embed_dim, mae_ratio, empty_mask_ratio

        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=(patch_h, patch_w), stride=(patch_h, patch_w))
        self.empty_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, norm_layer=norm_layer)
                                     for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.register_buffer("rope_freqs", rope_freqs(embed_dim // num_heads), persistent=False)
        self.feature_info = [
            LevelInfo(grid_size=(1, 1), dim=embed_dim, window_size=(1, 1), downsample=self.img_size, name="cls"),
            # Every token attends to every other: the window is the whole grid.
            LevelInfo(grid_size=self.grid_size, dim=embed_dim, window_size=self.grid_size,
                      downsample=self.patch_size, name="patches"),
        ]
        self._init_weights()

    def _init_weights(self) -> None:
        # timm / MAE: truncated-normal linears with zero bias, tokens normal(0.02). The patch
        # embedding is a linear map of each patch too, so it is initialised like a linear.
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.empty_token, std=0.02)
        init_linears(self, (nn.Linear, nn.Conv2d))

    def no_weight_decay(self) -> set[str]:
        """Learned tokens stand in for content or a summary; decay would only pull them toward zero."""
        return {"empty_token", "cls_token"}

    def layer_ids(self) -> dict[str, int]:
        """Depth of every parameter for layer-wise learning-rate decay (BEiT, https://arxiv.org/abs/2106.08254):
        0 = patch embedding and tokens, block i = i + 1, the final norm one past the last block."""
        ids = {}
        for name, _ in self.named_parameters():
            parts = name.split(".")
            if parts[0] == "blocks":
                ids[name] = int(parts[1]) + 1
            elif parts[0] == "norm":
                ids[name] = len(self.blocks) + 1
            else:  # patch_embed, empty_token, cls_token
                ids[name] = 0
        return ids

    def _embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) -> tokens (B, N, D) with empty patches replaced, and non_empty (B, N)."""
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major
        non_empty = patch_non_empty(x, self.patch_size).flatten(1)  # (B, N)
        return apply_mask_token(tokens, non_empty, self.empty_token), non_empty

    def _visible(self, non_empty: Tensor, mask_ratio: float, mae_mask: Tensor | None) -> Tensor:
        """(B, N) bool, True = visible: the given mask, else a fresh MAE draw, else all visible."""
        if mae_mask is not None:
            return check_mask(mae_mask, *non_empty.shape, non_empty.device)
        if mask_ratio != 0:  # a negative ratio reaches masking's range check
            return self.draw_mask(non_empty, mask_ratio)
        return torch.ones_like(non_empty)

    def draw_mask(self, non_empty: Tensor, mask_ratio: float, generator: torch.Generator | None = None) -> Tensor:
        """(B, N) bool, True = visible: this encoder's kind of mask (MAE: the same count per sample,
        since masked tokens are dropped), for callers that fix it."""
        return draw_mae_mask(non_empty, mask_ratio, self.empty_mask_ratio, generator=generator)

    def _encode(self, tokens: Tensor, pos: Tensor, visible: Tensor) -> Tensor:
        """Visible tokens + CLS through the blocks: (B, N, D) -> (B, 1 + N_vis, D)."""
        B = tokens.shape[0]
        x = gather_visible(tokens, visible)  # (B, N_vis, D); checks equal counts per sample
        vis_pos = gather_visible(pos.expand(B, -1, -1), visible)  # (B, N_vis, 2), original positions
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + N_vis, D)
        angles = F.pad(rope_angles(vis_pos, self.rope_freqs), (0, 0, 1, 0))  # (B, 1 + N_vis, hd/2), CLS angle 0
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # (B, 1, 1 + N_vis, hd/2), shared by heads
        for blk in self.blocks:
            x = blk(x, rope=(cos, sin))
        return self.norm(x)

    def forward(self, x: Tensor, mask_ratio: float = 0.0, mae_mask: Tensor | None = None) -> EncoderOutput:
        """x (B, C, H, W) in [0, 1]; mae_mask (B, N) True = visible, with the same number of
        visible patches per sample (it wins over mask_ratio). Returns levels [CLS, patches]."""
        check_roll(x, self.in_chans, self.img_size, type(self).__name__, self.cls_token.dtype)
        tokens, non_empty = self._embed(x)  # (B, N, D), (B, N)
        visible = self._visible(non_empty, mask_ratio, mae_mask)  # (B, N)
        pos = grid_positions(*self.grid_size, device=x.device)  # (N, 2)
        z = self._encode(tokens, pos, visible)  # (B, 1 + N_vis, D)
        B = x.shape[0]
        cls = PatchState(z[:, :1], pos.new_zeros(1, 2), non_empty.any(dim=1, keepdim=True), visible.new_ones(B, 1))
        patches = PatchState(scatter_visible(z[:, 1:], visible), pos, non_empty, visible)  # zeros where masked
        return EncoderOutput(HierarchicalPatchState([cls, patches], list(self.feature_info)), pos, non_empty, visible)


class ViTDecoder(nn.Module):
    """Decodes a ViTEncoder's output back to pixel logits (B, out_channels, H, W).

    Patch tokens are projected to `decoder_dim`; masked patches (whose encoder output is zeros)
    get a learned mask token, as in MAE's decoder; the CLS token is projected and added to every
    position, carrying the global summary; then `depth` RoPE blocks over the full grid, a norm
    and an unpatchify head ("linear", "pixelshuffle" or "convtranspose").
    """

    def __init__(self, img_height: int, img_width: int, patch_h: int = 16, patch_w: int = 16,
                 out_channels: int = 1, embed_dim: int = 256, decoder_dim: int = 256, depth: int = 4,
                 num_heads: int = 8, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, head: str = "linear") -> None:
        super().__init__()
        if (decoder_dim // num_heads) % 4 or decoder_dim % num_heads:
            raise ValueError(f"decoder_dim / num_heads = {decoder_dim}/{num_heads} must be a whole multiple of 4 "
                             f"(2D RoPE); change decoder_dim or num_heads")
        self.grid_size = (img_height // patch_h, img_width // patch_w)
        self.embed_dim = embed_dim
        self.embed = nn.Linear(embed_dim, decoder_dim)
        self.cls_proj = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(decoder_dim))
        self.blocks = nn.ModuleList([Block(decoder_dim, num_heads, mlp_ratio, qkv_bias, 0.0, norm_layer=norm_layer)
                                     for _ in range(depth)])
        self.norm = norm_layer(decoder_dim)
        self.head = Unpatchify(decoder_dim, out_channels, (patch_h, patch_w), head)
        self.register_buffer("rope_freqs", rope_freqs(decoder_dim // num_heads), persistent=False)
        init_linears(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def forward(self, enc_out: EncoderOutput) -> Tensor:
        cls, patches = enc_out.patches[0], enc_out.patches[-1]
        N = self.grid_size[0] * self.grid_size[1]
        if len(enc_out.patches) != 2 or patches.emb.shape[1:] != (N, self.embed_dim):
            raise ValueError(f"{type(self).__name__} expects a ViTEncoder output with levels [CLS, {N} patches] of "
                             f"dim {self.embed_dim}; build it with the encoder's image size, patch size and embed_dim")
        B = patches.batch_size
        x = apply_mask_token(self.embed(patches.emb), patches.mae_mask, self.mask_token)  # (B, N, dd)
        x = x + self.cls_proj(cls.emb)  # (B, 1, dd) broadcast over positions
        angles = rope_angles(patches.pos.expand(B, -1, -1), self.rope_freqs)  # (B, N, hd/2)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        for blk in self.blocks:
            x = blk(x, rope=(cos, sin))
        return self.head(self.norm(x).view(B, *self.grid_size, -1))  # (B, C, H, W)


def ViTMAEDecoder(img_height: int, img_width: int, patch_h: int = 16, patch_w: int = 16, out_channels: int = 1,
                  embed_dim: int = 256, decoder_dim: int = 128, depth: int = 2, num_heads: int = 4,
                  **kwargs) -> ViTDecoder:
    """The lightweight decoder for MAE pretraining: a ViTDecoder narrower and shallower than the
    encoder, as in MAE (https://arxiv.org/abs/2111.06377), so pretraining spends its compute on
    the encoder."""
    return ViTDecoder(img_height, img_width, patch_h, patch_w, out_channels, embed_dim, decoder_dim, depth,
                      num_heads, **kwargs)
