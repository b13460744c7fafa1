"""Data structures shared by encoders, decoders, losses and evaluation.

Conventions (see DESIGN.md): tokens are `(B, N, D)` with `N = rows * cols` in row-major
order and `pos[n] = (row, col)`; masks are bool with True = visible; levels are ordered
coarsest first.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


def grid_positions(rows: int, cols: int, device: torch.device | str | None = None) -> Tensor:
    """(row, col) of every cell of a `rows x cols` grid in row-major order: `(rows*cols, 2)` long."""
    r, c = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    return torch.stack([r, c], dim=-1).reshape(-1, 2)


@dataclass(frozen=True)
class LevelInfo:
    """What the encoder knows about one level of its hierarchy (timm's `feature_info`)."""

    grid_size: tuple[int, int]  # (rows, cols) of the token grid
    dim: int  # channels per token
    window_size: tuple[int, int]  # attention window after clamping to the grid; the whole grid for global
    # attention; (1, 1) for a token that attends as a non-grid token (e.g. ViT's CLS)
    downsample: tuple[int, int]  # input pixels per token along (pitch, time)
    name: str = ""  # e.g. "stages.3"


@dataclass
class PatchState:
    """One level of tokens.

    emb:       (B, N, D) embeddings
    pos:       (N, 2) long, (row, col) of each token on this level's grid
    non_empty: (B, N) bool, True where the token's receptive field holds any note
    mae_mask:  (B, N) bool, True = visible to the encoder, False = masked
    """

    emb: Tensor
    pos: Tensor
    non_empty: Tensor
    mae_mask: Tensor

    def __post_init__(self) -> None:
        B, N, _ = self.emb.shape
        if self.pos.shape != (N, 2):
            raise ValueError(f"pos must be (N, 2) = ({N}, 2) to match emb {tuple(self.emb.shape)}, got {tuple(self.pos.shape)}")
        for name in ("non_empty", "mae_mask"):
            t = getattr(self, name)
            if t.shape != (B, N):
                raise ValueError(f"{name} must be (B, N) = ({B}, {N}) to match emb, got {tuple(t.shape)}")

    @property
    def dim(self) -> int:
        return self.emb.shape[-1]

    @property
    def num_patches(self) -> int:
        return self.emb.shape[1]

    @property
    def batch_size(self) -> int:
        return self.emb.shape[0]

    def pooled(self, non_empty_only: bool = True) -> Tensor:
        """(B, D): the mean over the non-empty tokens (a crop is mostly the empty token, whose
        embedding would otherwise dominate the mean), or over every token. A sample with no
        non-empty token pools to zeros."""
        if not non_empty_only:
            return self.emb.mean(1)
        keep = self.non_empty[..., None].to(self.emb.dtype)  # (B, N, 1)
        return (self.emb * keep).sum(1) / keep.sum(1).clamp_min(1)

    def column_means(self, grid: tuple[int, int] | None = None) -> Tensor:
        """(B, cols, D): each column (time position) of the level's grid as the mean of its
        non-empty tokens, zeros where the column is silent: the level's profile over time.
        `grid`: the level's (rows, cols) when the caller knows it (`LevelInfo.grid_size`);
        otherwise read from `pos`, which costs a device-to-host copy on an accelerator."""
        rows, cols = grid or (int(self.pos[:, 0].max()) + 1, int(self.pos[:, 1].max()) + 1)
        B, _, D = self.emb.shape
        emb = self.emb.reshape(B, rows, cols, D)
        keep = self.non_empty.reshape(B, rows, cols, 1).to(emb.dtype)
        return (emb * keep).sum(1) / keep.sum(1).clamp_min(1)

    @property
    def visible(self) -> Tensor:
        """Embeddings of the visible tokens of all samples, flattened: (n_visible, D)."""
        return self.emb[self.mae_mask]

    @property
    def masked(self) -> Tensor:
        """Embeddings of the masked tokens of all samples, flattened: (n_masked, D)."""
        return self.emb[~self.mae_mask]

    def to(self, *args, **kwargs) -> PatchState:
        """Like `Tensor.to`; dtype casts apply to `emb` only (positions and masks keep theirs)."""
        device_only = [a for a in args if not isinstance(a, torch.dtype)]
        dev_kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
        return PatchState(
            emb=self.emb.to(*args, **kwargs),
            pos=self.pos.to(*device_only, **dev_kwargs),
            non_empty=self.non_empty.to(*device_only, **dev_kwargs),
            mae_mask=self.mae_mask.to(*device_only, **dev_kwargs),
        )


@dataclass
class HierarchicalPatchState:
    """All levels of an encoder's pyramid, coarsest first (`levels[0]` is the global grid).

    `info[i]` describes `levels[i]` (grid, dim, window, downsample) when the encoder supplies it.
    """

    levels: list[PatchState]
    info: list[LevelInfo] | None = None

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError("HierarchicalPatchState needs at least one level")
        if self.info is not None and len(self.info) != len(self.levels):
            raise ValueError(f"info has {len(self.info)} entries for {len(self.levels)} levels")

    def __getitem__(self, i: int) -> PatchState:
        return self.levels[i]

    def __len__(self) -> int:
        return len(self.levels)

    def __iter__(self):
        return iter(self.levels)

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def coarsest(self) -> PatchState:
        return self.levels[0]

    @property
    def finest(self) -> PatchState:
        return self.levels[-1]

    @property
    def all_emb(self) -> list[Tensor]:
        """Every level's `emb`, coarsest first: [(B, N_i, D_i)]."""
        return [lvl.emb for lvl in self.levels]

    def to(self, *args, **kwargs) -> HierarchicalPatchState:
        return HierarchicalPatchState([lvl.to(*args, **kwargs) for lvl in self.levels], self.info)


@dataclass
class EncoderOutput:
    """What every encoder returns.

    patches:        the hierarchy, coarsest first
    full_pos:       (N, 2) positions on the finest (patch-embedding) grid
    full_non_empty: (B, N) bool, non-empty patches on the finest grid
    mae_mask:       (B, N) bool, True = visible, on the finest grid
    time:           the time stage's tokens beside the pyramid, one per finest-grid column
                    (`SwinEncoder(time_stage_dim=...)`), or None
    """

    patches: HierarchicalPatchState
    full_pos: Tensor
    full_non_empty: Tensor
    mae_mask: Tensor
    time: PatchState | None = None

    @property
    def hierarchical(self) -> HierarchicalPatchState:
        return self.patches

    @property
    def patch_state(self) -> PatchState:
        """The final (coarsest) level."""
        return self.patches.coarsest

    @property
    def latent(self) -> Tensor:
        """The final level's embeddings: (B, N_0, D_0)."""
        return self.patches.coarsest.emb

    def to(self, *args, **kwargs) -> EncoderOutput:
        device_only = [a for a in args if not isinstance(a, torch.dtype)]
        dev_kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
        return replace(
            self,
            patches=self.patches.to(*args, **kwargs),
            full_pos=self.full_pos.to(*device_only, **dev_kwargs),
            full_non_empty=self.full_non_empty.to(*device_only, **dev_kwargs),
            mae_mask=self.mae_mask.to(*device_only, **dev_kwargs),
            time=None if self.time is None else self.time.to(*args, **kwargs),
        )
