"""Resolution changes between stages, on NHWC grids."""
from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens -> one token: (B, H, W, C) -> (B, H/2, W/2, out_dim).

    The four tokens are concatenated in timm's order (so its weights load), then projected.
    version=2 normalises after the projection (Swin V2), version=1 before it (Swin V1).
    """

    def __init__(self, dim: int, out_dim: int | None = None,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, version: int = 2) -> None:
        super().__init__()
        self.out_dim = out_dim or 2 * dim
        self.version = version
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)
        self.norm = norm_layer(self.out_dim if version == 2 else 4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"PatchMerging needs an even grid, got {H}x{W}")
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)  # (B, H/2, W/2, 4C)
        if self.version == 2:
            return self.norm(self.reduction(x))
        return self.reduction(self.norm(x))


class PatchExpand(nn.Module):
    """One token -> 2x2 tokens, the inverse resolution step of PatchMerging (as in Swin-Unet,
    https://arxiv.org/abs/2105.05537): (B, H, W, C) -> (B, 2H, 2W, out_dim), out_dim = C/2 by default."""

    def __init__(self, dim: int, out_dim: int | None = None,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.out_dim = out_dim or dim // 2
        self.expand = nn.Linear(dim, 4 * self.out_dim, bias=False)
        self.norm = norm_layer(self.out_dim)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, _ = x.shape
        x = self.expand(x).reshape(B, H, W, 2, 2, self.out_dim)  # (.., dh, dw, C')
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, 2 * H, 2 * W, self.out_dim)
        return self.norm(x)


class PatchEmbed(nn.Module):
    """Non-overlapping conv patch embedding + norm: (B, C, H, W) -> (B, H/ph, W/pw, D), NHWC.

    `fold`: the channels are averaged into one before the projection. For a frame + onset roll
    (onsets lie inside the frame) that is 0 silent, 0.5 held, 1 onset: every pixel's two bits as one
    value, so the ph*pw -> D projection stays injective on the rolls it can see (with D >= ph*pw),
    where a 2*ph*pw -> D one cannot be."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: tuple[int, int],
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, fold: bool = False) -> None:
        super().__init__()
        self.patch_size, self.fold = tuple(patch_size), fold
        self.proj = nn.Conv2d(1 if fold else in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        if self.fold:
            x = x.mean(1, keepdim=True)  # (B, 1, H, W)
        # The conv's weights applied as one matmul over the patches cut out by a reshape (kernel =
        # stride, so that is the same map): the CPU's conv backward for the weight took about three
        # times as long as the matmul's, and the output comes out NHWC without a permute.
        B, C, H, W = x.shape
        ph, pw = self.patch_size
        gh, gw = H // ph, W // pw
        patches = x[:, :, : gh * ph, : gw * pw].reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
        return self.norm(F.linear(patches.reshape(B, gh, gw, C * ph * pw), self.proj.weight.flatten(1), self.proj.bias))


class Unpatchify(nn.Module):
    """Tokens back to pixel logits: (B, gh, gw, D) -> (B, C, gh*ph, gw*pw).

    mode "linear": one linear map per token to its ph*pw*C pixels (MAE's head).
    mode "pixelshuffle": a 3x3 conv over the token grid to C*ph*pw channels, then PixelShuffle,
    so each patch also sees its neighbours (needs ph == pw).
    mode "convtranspose": a transposed conv with kernel = stride = patch.
    """

    MODES = ("linear", "pixelshuffle", "convtranspose")

    def __init__(self, dim: int, out_chans: int, patch_size: tuple[int, int], mode: str = "linear") -> None:
        super().__init__()
        ph, pw = self.patch_size = tuple(patch_size)
        self.out_chans, self.mode = out_chans, mode
        if mode == "linear":
            self.proj = nn.Linear(dim, ph * pw * out_chans)
        elif mode == "pixelshuffle":
            if ph != pw:
                raise ValueError(f"the pixelshuffle head needs square patches, got {ph}x{pw}; use head='linear'")
            self.proj = nn.Sequential(nn.Conv2d(dim, out_chans * ph * pw, 3, padding=1), nn.PixelShuffle(ph))
        elif mode == "convtranspose":
            self.proj = nn.ConvTranspose2d(dim, out_chans, kernel_size=self.patch_size, stride=self.patch_size)
        else:
            raise ValueError(f"unknown head {mode!r}; choose one of {', '.join(self.MODES)}")

    def patch_logits(self, tokens: Tensor) -> Tensor:
        """Mode "linear" only, where each patch is its own token's: (M, D) -> (M, C, ph, pw)."""
        if self.mode != "linear":
            raise ValueError(f"head {self.mode!r} reads neighbouring tokens; per-token patches need head='linear'")
        ph, pw = self.patch_size
        return self.proj(tokens).view(-1, ph, pw, self.out_chans).permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        B, gh, gw, _ = x.shape
        if self.mode != "linear":
            return self.proj(x.permute(0, 3, 1, 2))  # NCHW for the convs
        ph, pw = self.patch_size
        x = self.proj(x).reshape(B, gh, gw, ph, pw, self.out_chans)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(B, self.out_chans, gh * ph, gw * pw)
