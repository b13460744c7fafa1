"""Heads trained on an encoder's pyramid: a masked embedding predictor and multi-scale
reconstruction heads. Both take an `EncoderOutput` and work for any level grids (1 x 1,
1 x 2, 32 x 64, ...): grid sizes come from the encoder's `LevelInfo`, never from sqrt(N).
"""
import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .core import EncoderOutput, HierarchicalPatchState
from .layers import Block
from .masking import apply_mask_token, check_mask, level_mask
from .utils import init_linears


def level_grids(patches: HierarchicalPatchState) -> list[tuple[int, int]]:
    """(rows, cols) of every level: from the encoder's LevelInfo, else from the positions (max + 1)."""
    if patches.info is not None:
        return [tuple(info.grid_size) for info in patches.info]
    return [tuple((lvl.pos.amax(0) + 1).tolist()) for lvl in patches]


def grid_features(pos: Tensor, grid: tuple[int, int], num_freqs: int) -> Tensor:
    """Sinusoidal features of cell centres in the unit square: (N, 2) (row, col) -> (N, 4 * num_freqs).

    Coordinates are normalised by the level's own grid, (row + 0.5) / rows, so a coarse cell
    and the fine cells under it land at nearby points and every grid shape shares one frame.
    Frequencies pi * 2**k (k < num_freqs) resolve grids up to about 2**num_freqs cells per side.
    """
    u = (pos.float() + 0.5) / torch.tensor(grid, device=pos.device, dtype=torch.float32)  # (N, 2) in (0, 1)
    freqs = math.pi * 2.0 ** torch.arange(num_freqs, device=pos.device)  # (F,)
    angles = u[..., None] * freqs  # (N, 2, F)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)  # (N, 4F)


class SwinMaskedEmbeddingPredictor(nn.Module):
    """Perceiver-style predictor of a pyramid's embeddings from a masked copy (I-JEPA-like,
    https://arxiv.org/abs/2301.08243). Flow: Mask -> Summarize -> Mix -> Predict.

    - Mask: per level and per sample, a fraction of positions is replaced by a learned mask
      token (drawn by `masking.level_mask`; True = visible). Level i's ratio is
      `mask_ratio * level_mask_scale[i]`; a float `level_mask_scale = g` means the finest level
      gets `mask_ratio` and each coarser level `1 / g` of the next finer one. Counts are rounded
      stochastically, so a 1 x 1 level is masked with probability equal to its ratio per sample
      (then it is predicted from the other levels alone). `empty_mask_ratio` < 1 masks empty
      positions less (as the encoders do); the default masks uniformly.
    - Summarize: each level's tokens (+ 2-D position features) are read by `n_summaries[i]`
      learned queries through cross-attention; a learned level embedding is added.
    - Mix: `mix_depth` self-attention blocks over all levels' summaries together.
    - Predict: one query per position of every level (sinusoidal features of its (row, col)
      normalised by that level's grid, + the level embedding) cross-attends to the mixed
      summaries; a per-level linear head maps to D_i.

    `dims` are the encoder's level widths, coarsest first (default: `SwinEncoder` with
    embed_dim 8 and 6 stages). The predictor draws its own masks; the encoder's `mae_mask` is
    not consulted. The loss is computed outside, on masked positions only
    (`losses.mep_loss`), against targets from another view / a teacher.
    """

    def __init__(self, dims: Sequence[int] = (256, 128, 64, 32, 16, 8), summary_dim: int = 128,
                 n_summaries: int | Sequence[int] | None = None, mix_depth: int = 2, heads: int = 4,
                 mask_ratio: float = 0.4, level_mask_scale: float | Sequence[float] = 1.25,
                 empty_mask_ratio: float = 1.0, mlp_ratio: float = 4.0, num_freqs: int = 8,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.dims, L, S = tuple(dims), len(dims), summary_dim
        if n_summaries is None:
            n_summaries = tuple(2**i for i in range(L))  # 1 for the global level, doubling toward the finest
        self.n_summaries = (n_summaries,) * L if isinstance(n_summaries, int) else tuple(n_summaries)
        if isinstance(level_mask_scale, (int, float)):
            level_mask_scale = tuple(float(level_mask_scale) ** -(L - 1 - i) for i in range(L))
        self.level_mask_scale = tuple(level_mask_scale)
        if len(self.n_summaries) != L or len(self.level_mask_scale) != L:
            raise ValueError(f"n_summaries {self.n_summaries} and level_mask_scale {self.level_mask_scale} "
                             f"need one entry per level of dims {self.dims}")
        self.mask_ratio, self.empty_mask_ratio, self.num_freqs = mask_ratio, empty_mask_ratio, num_freqs
        self.level_mask_ratios(mask_ratio)  # validate now, not at the first forward

        self.mask_tokens = nn.ParameterList([nn.Parameter(torch.zeros(d)) for d in dims])
        self.level_in = nn.ModuleList([nn.Sequential(norm_layer(d), nn.Linear(d, S)) for d in dims])
        self.pos_embed = nn.Linear(4 * num_freqs, S)
        self.level_embed = nn.Parameter(torch.zeros(L, S))
        self.summary_queries = nn.ParameterList([nn.Parameter(torch.zeros(1, n, S)) for n in self.n_summaries])
        self.summarizers = nn.ModuleList([Block(S, heads, mlp_ratio, cross=True, norm_layer=norm_layer) for _ in dims])
        self.mixer = nn.ModuleList([Block(S, heads, mlp_ratio, norm_layer=norm_layer) for _ in range(mix_depth)])
        self.predictor = Block(S, heads, mlp_ratio, cross=True, norm_layer=norm_layer)
        self.norm = norm_layer(S)
        self.heads = nn.ModuleList([nn.Linear(S, d) for d in dims])
        self._init_weights()

    def _init_weights(self) -> None:
        init_linears(self)
        for p in (*self.mask_tokens, *self.summary_queries, self.level_embed):
            nn.init.normal_(p, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Learned tokens, queries and the level embedding: decay would only pull them toward zero."""
        lists = {"mask_tokens": self.mask_tokens, "summary_queries": self.summary_queries}
        return {"level_embed"} | {f"{name}.{i}" for name, ps in lists.items() for i in range(len(ps))}

    def level_mask_ratios(self, mask_ratio: float | None = None) -> list[float]:
        """Masking ratio of each level, coarsest first."""
        r = self.mask_ratio if mask_ratio is None else mask_ratio
        ratios = [r * s for s in self.level_mask_scale]
        if not all(0.0 <= q < 1.0 for q in ratios):
            raise ValueError(f"mask_ratio {r} x level_mask_scale {self.level_mask_scale} gives level ratios "
                             f"{[round(q, 3) for q in ratios]}; each must be in [0, 1): lower mask_ratio or the scales")
        return ratios

    def draw_masks(self, patches: HierarchicalPatchState, mask_ratio: float | None = None) -> list[Tensor]:
        """Per-level (B, N_i) bool, True = visible, drawn per sample."""
        ratios = self.level_mask_ratios(mask_ratio)
        return [level_mask(lvl.non_empty, r, self.empty_mask_ratio) for lvl, r in zip(patches, ratios)]

    def _check(self, patches: HierarchicalPatchState) -> None:
        got = tuple(lvl.dim for lvl in patches)
        if got != self.dims:
            raise ValueError(f"predictor was built for level dims {self.dims} but the encoder output has {got}; "
                             f"build it with dims={got}")

    def summarize(self, patches: HierarchicalPatchState, masks: list[Tensor], pos: list[Tensor]) -> Tensor:
        """Masked levels -> their summaries, concatenated: (B, sum n_i, S)."""
        out = []
        for i, (lvl, visible, p) in enumerate(zip(patches, masks, pos)):
            B = lvl.emb.shape[0]
            x = apply_mask_token(lvl.emb, visible, self.mask_tokens[i])  # (B, N_i, D_i)
            kv = self.level_in[i](x) + p  # (B, N_i, S)
            q = self.summary_queries[i].expand(B, -1, -1)  # (B, n_i, S)
            out.append(self.summarizers[i](q, kv) + self.level_embed[i])
        return torch.cat(out, dim=1)

    def predict(self, summaries: Tensor, queries: list[Tensor]) -> list[Tensor]:
        """Mixed summaries (B, sum n_i, S) and each level's queries (B, K_i, S) -> predictions
        [(B, K_i, D_i)]. Queries do not attend to each other, so all levels' queries run as one
        sequence, and any subset of them gets the predictions it would get among all."""
        x = self.norm(self.predictor(torch.cat(queries, dim=1), summaries))  # (B, sum K_i, S)
        chunks = x.split([q.shape[1] for q in queries], dim=1)  # [(B, K_i, S)]
        return [head(c) for head, c in zip(self.heads, chunks)]

    def forward(self, enc_out: EncoderOutput, mask_ratio: float | None = None, masks: Sequence[Tensor] | None = None,
                at: Sequence[Tensor] | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Returns (preds, masks): preds[i] (B, N_i, D_i) for every position, masks[i] (B, N_i)
        bool, True = visible. `mask_ratio` None uses self.mask_ratio; given `masks` are used as is.
        `at`: per level (B, K_i) long positions; preds[i] is then (B, K_i, D_i), the predictions at
        those positions only (equal to the full preds gathered there, for a fraction of the cost)."""
        patches = enc_out.patches
        self._check(patches)
        if masks is None:
            masks = self.draw_masks(patches, mask_ratio)
        else:
            masks = [check_mask(m, *lvl.emb.shape[:2], lvl.emb.device) for m, lvl in zip(masks, patches, strict=True)]
        pos = [self.pos_embed(grid_features(lvl.pos, grid, self.num_freqs))  # [(N_i, S)]
               for lvl, grid in zip(patches, level_grids(patches))]
        summaries = self.summarize(patches, masks, pos)  # (B, sum n_i, S)
        for blk in self.mixer:
            summaries = blk(summaries)
        B = summaries.shape[0]
        queries = [p + self.level_embed[i] for i, p in enumerate(pos)]  # [(N_i, S)]
        if at is None:
            queries = [q.expand(B, -1, -1) for q in queries]
        else:
            queries = [q[idx] for q, idx in zip(queries, at, strict=True)]  # [(B, K_i, S)]
        return self.predict(summaries, queries), masks


def positions(select: Tensor) -> tuple[Tensor, Tensor]:
    """The positions where select (B, N) bool is True, per sample and in order, padded to the
    largest count K: (index (B, K) long, valid (B, K) bool). Padding points at position 0."""
    count = select.sum(1)  # (B,)
    K = int(count.max()) if select.numel() else 0
    index = (~select).to(torch.uint8).argsort(dim=1, stable=True)[:, :K]  # selected first, in order
    valid = torch.arange(K, device=select.device) < count[:, None]
    return index.masked_fill(~valid, 0), valid


class MultiScaleReconHeads(nn.Module):
    """Per-level heads that reconstruct the max-pooled piano roll at each level's resolution.

    Each token (B, N_i, D_i) predicts the logits of an `upsample x upsample` block of the roll
    max-pooled to (rows_i * upsample, cols_i * upsample), so level i's output is
    (B, out_chans, rows_i * upsample, cols_i * upsample). With upsample 1 (default) a token
    predicts "is any note under me" per channel. Train with `losses.multiscale_recon_loss`,
    which pools the target to each output's size.
    """

    def __init__(self, level_dims: Sequence[int], out_chans: int = 1, upsample: int = 1,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.out_chans, self.upsample = out_chans, upsample
        self.heads = nn.ModuleList([nn.Sequential(norm_layer(d), nn.Linear(d, out_chans * upsample**2))
                                    for d in level_dims])
        init_linears(self)

    def forward(self, enc_out: EncoderOutput) -> list[Tensor]:
        """Logits per level, coarsest first: [(B, out_chans, rows_i * u, cols_i * u)]."""
        C, u, out = self.out_chans, self.upsample, []
        for lvl, (h, w), head in zip(enc_out.patches, level_grids(enc_out.patches), self.heads, strict=True):
            B = lvl.emb.shape[0]
            x = head(lvl.emb).view(B, h, w, C, u, u)  # tokens are row-major: n = row * w + col
            out.append(x.permute(0, 3, 1, 4, 2, 5).reshape(B, C, h * u, w * u))
        return out
