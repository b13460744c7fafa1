"""Swin Transformer V2 models for piano rolls.

`SwinEncoder` is a drop-in replacement for `ViTEncoder`: same constructor vocabulary, same
`forward(x, mask_ratio, mae_mask) -> EncoderOutput`. Instead of one flat grid it returns a
pyramid, coarsest first: with the defaults a 128 x 128 roll gives grids 1x1, 2x2, ..., 32x32.
"""
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import EncoderOutput, HierarchicalPatchState, LevelInfo, PatchState, grid_positions
from .geometry import pyramid_error
from .layers import (PatchEmbed, PatchExpand, SwinBlock, SwinStage, Unpatchify, clamp_window,
                     resize_relative_position_bias_table)
from .masking import apply_mask_token, check_mask, level_mask, patch_non_empty, pool_mask, simmim_mask
from .predictor import SwinMaskedEmbeddingPredictor  # noqa: F401  (public here: midi_rae.swin is the Swin API)
from .utils import check_positive, check_rates, check_roll, init_linears, submodule_no_weight_decay


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


def init_weights(model: nn.Module, version: int) -> None:
    """timm / MAE init: truncated-normal linears with zero bias. Swin V2's res-post-norms start
    at zero, so every block starts as the identity (https://arxiv.org/abs/2111.09883)."""
    init_linears(model)
    for m in model.modules():
        if isinstance(m, SwinBlock) and version == 2:
            for norm in (m.norm1, m.norm2):
                nn.init.zeros_(norm.weight)
                nn.init.zeros_(norm.bias)


def sinusoidal_positions(n: int, dim: int) -> Tensor:
    """(n, dim): the Transformer's sine / cosine position code (https://arxiv.org/abs/1706.03762)."""
    freq = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))  # (dim / 2,)
    angle = torch.arange(n)[:, None] * freq  # (n, dim / 2)
    return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)[:, :dim]


def level_profiles(levels: HierarchicalPatchState) -> Tensor:
    """(B, cols, sum of the levels' dims): every level's column means (`PatchState.column_means`),
    each repeated to the finest grid's columns, concatenated, under stop-gradient: what the time
    stages read, so that the pyramid is not shaped by them. The grids come from `levels.info`, so
    no shape is read back from the device."""
    cols = levels.info[-1].grid_size[1]
    profiles = [lvl.column_means(info.grid_size).detach() for lvl, info in zip(levels, levels.info)]  # [(B, c, D)]
    return torch.cat([c.repeat_interleave(cols // c.shape[1], dim=1) for c in profiles], dim=-1)


class TimeStage(nn.Module):
    """A stage beside the pyramid that reads it over time: the levels' profiles (`level_profiles`)
    through a Linear, a sinusoidal position per column (no table, so a crop of any width runs) and
    `depth` pre-norm Transformer layers attending over the whole crop: one token per finest column.

    It reads the levels under stop-gradient, so what it is trained for (the crop's descriptors,
    the metre weighted up: `models.TimeDescriptorHead`) never displaces what the pyramid holds;
    its own width and global attention in time are what the levels' windowed, narrow tokens lack
    for the period of the bar."""

    def __init__(self, level_dims: Sequence[int], dim: int, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(sum(level_dims)), nn.Linear(sum(level_dims), dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, levels: HierarchicalPatchState) -> PatchState:
        finest = levels.finest
        rows, cols = levels.info[-1].grid_size
        x = self.proj(level_profiles(levels))  # (B, cols, dim)
        tokens = self.norm(self.blocks(x + sinusoidal_positions(cols, x.shape[-1]).to(x)))
        B = tokens.shape[0]
        return PatchState(tokens, grid_positions(1, cols, tokens.device),
                          finest.non_empty.reshape(B, rows, cols).any(1), finest.mae_mask.reshape(B, rows, cols).all(1))


def lagged_autocorrelation(g: Tensor, lags: int) -> Tensor:
    """(B, T, S) signals -> (B, S, lags): sum_t g[t] g[t + k] / sum_t g[t]^2 for k = 1..lags, in one
    product over a strided view (0 where k >= T)."""
    later = F.pad(g, (0, 0, 0, lags)).unfold(1, g.shape[1], 1)[:, 1:]  # (B, lags, S, T): g shifted by 1..lags
    return torch.einsum("bts,bkst->bsk", g, later) / (g * g).sum(1).clamp_min(1e-6).unsqueeze(-1)


class AutocorrTimeStage(nn.Module):
    """A time stage that computes periodicity instead of attending for it: the levels' profiles
    (`level_profiles`, under stop-gradient, as `TimeStage`) through a per-column MLP to `signals`
    soft onset-like signals in (0, 1); each signal's autocorrelation at lags 1..`lags` columns,
    divided by its energy (as `descriptors`' onset autocorrelation is), and its mean, through a
    Linear and a LayerNorm: one token for the crop. The lagged products, which a regression over
    the columns only approximates (benchmarks/RESULTS.md, "sixteenth pass"), are computed
    exactly; what is learned is which signals to correlate. Lags past the crop give 0."""

    def __init__(self, level_dims: Sequence[int], dim: int, signals: int = 16, lags: int = 32) -> None:
        super().__init__()
        self.lags = lags
        self.signal = nn.Sequential(nn.LayerNorm(sum(level_dims)), nn.Linear(sum(level_dims), dim), nn.GELU(),
                                    nn.Linear(dim, signals))
        self.proj = nn.Linear(signals * (lags + 1), dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, levels: HierarchicalPatchState) -> PatchState:
        finest = levels.finest
        g = torch.sigmoid(self.signal(level_profiles(levels)))  # (B, cols, S)
        ac = lagged_autocorrelation(g, self.lags)  # (B, S, lags)
        token = self.norm(self.proj(torch.cat([ac, g.mean(1).unsqueeze(-1)], dim=-1).flatten(1)))  # (B, dim)
        B = token.shape[0]
        return PatchState(token[:, None], grid_positions(1, 1, token.device), finest.non_empty.reshape(B, -1).any(1, keepdim=True),
                          finest.mae_mask.reshape(B, -1).all(1, keepdim=True))


TIME_STAGES = ("transformer", "autocorr")  # `time_stage_kind`: TimeStage, AutocorrTimeStage


class SwinEncoder(nn.Module):
    """Swin Transformer V2 encoder (https://arxiv.org/abs/2111.09883) for (B, C, H, W) piano rolls.

    Patch embedding, empty-patch token, SimMIM masking (masked patches get a learned token and
    the grid stays whole, so windowed attention runs unchanged), then one stage per entry of
    `depths`, each halving the grid (except the first) and doubling the width. Every stage's
    output is a level of the returned hierarchy.

    `mae_ratio` is the masking ratio for pretraining, read by the training engine and passed as
    `mask_ratio`; `forward` masks only what `mask_ratio` / `mae_mask` ask, so evaluation is never
    masked by accident. `squash_coarse` overwrites empty positions at every level with a learned
    per-level empty token; a masked patch is not known to be empty, so neither it nor a coarse
    token over it is squashed. `inter_stage_mask_ratio` > 0 adds dropout-style masking between
    stages in training mode: a fraction `inter_stage_mask_ratio / 2**i` of stage i's input tokens (i >= 1)
    is replaced by a learned token, so every scale must cope with missing detail; the levels
    returned are the unmasked stage outputs. `version=1` builds Swin V1 blocks instead.
    `grad_checkpointing` recomputes every block in the backward pass of a training forward
    (`set_grad_checkpointing`), keeping only each block's input. `fold_onsets` averages the
    input's channels before the patch projection (`PatchEmbed`): a frame + onset roll enters as
    one value per pixel, 0 silent, 0.5 held, 1 onset.

    `time_stage_dim` > 0 adds a `TimeStage` of that width (`time_stage_depth` layers,
    `time_stage_heads` heads) beside the pyramid: the output's `time`, one token per finest column;
    with `time_stage_kind="autocorr"` an `AutocorrTimeStage` instead (`time_stage_signals` signals,
    `time_stage_lags` lags): one token per crop.

    `pretrained_window_sizes` (V2, one per stage, finest first: an int or (h, w)) are the windows
    the weights were trained at, for weights that run at another window or input size: each
    stage's position-bias MLP then reads its offsets on the trained scale (Swin V2's transfer; timm's
    `pretrained_window_sizes`). A V1 encoder gets its bias tables resized instead
    (`resize_position_tables`). `stage_windows` gives the windows of a geometry.
    """

    def __init__(self, img_height: int, img_width: int, patch_h: int = 4, patch_w: int = 4, in_chans: int = 1,
                 embed_dim: int = 8, depths: Sequence[int] = (1, 2, 2, 6, 2, 1),
                 num_heads: Sequence[int] = (1, 1, 2, 4, 8, 16), window_size: int | Sequence[int] = 8,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, mae_ratio: float = 0.0,
                 empty_mask_ratio: float = 0.05, squash_coarse: bool = False, inter_stage_mask_ratio: float = 0.0,
                 inter_stage_mask_all: bool = False, version: int = 2, grad_checkpointing: bool = False,
                 pretrained_window_sizes: Sequence[int | Sequence[int]] | None = None,
                 fold_onsets: bool = False, time_stage_dim: int = 0, time_stage_depth: int = 2,
                 time_stage_heads: int = 4, time_stage_kind: str = "transformer", time_stage_signals: int = 16,
                 time_stage_lags: int = 32) -> None:
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        check_positive(type(self).__name__, img_height=img_height, img_width=img_width, patch_h=patch_h, patch_w=patch_w,
                       in_chans=in_chans, embed_dim=embed_dim, num_heads=num_heads, window_size=window_size,
                       mlp_ratio=mlp_ratio)
        check_rates(type(self).__name__, drop_rate=drop_rate, proj_drop_rate=proj_drop_rate,
                    attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
                    inter_stage_mask_ratio=inter_stage_mask_ratio)
        _validate(img_height, img_width, patch_h, patch_w, embed_dim, depths, num_heads, mae_ratio, version)
        if time_stage_dim < 0 or (time_stage_dim and time_stage_kind == "transformer"
                                  and (time_stage_depth < 1 or time_stage_heads < 1 or time_stage_dim % time_stage_heads)):
            raise ValueError(f"time_stage_dim ({time_stage_dim}) must be 0 (no time stage) or a positive multiple of "
                             f"time_stage_heads ({time_stage_heads}), with time_stage_depth ({time_stage_depth}) >= 1")
        if time_stage_kind not in TIME_STAGES or time_stage_signals < 1 or time_stage_lags < 1:
            raise ValueError(f"time_stage_kind must be one of {TIME_STAGES} (got {time_stage_kind!r}), with "
                             f"time_stage_signals ({time_stage_signals}) and time_stage_lags ({time_stage_lags}) >= 1")
        pretrained = _pretrained_windows(pretrained_window_sizes, len(depths), version)
        self.inter_stage_mask_ratio, self.inter_stage_mask_all = inter_stage_mask_ratio, inter_stage_mask_all
        self.img_size, self.patch_size, self.in_chans = (img_height, img_width), (patch_h, patch_w), in_chans
        self.mae_ratio, self.empty_mask_ratio, self.squash_coarse = mae_ratio, empty_mask_ratio, squash_coarse
        self.grid_size = (img_height // patch_h, img_width // patch_w)
        self.num_stages = len(depths)

        self.patch_embed = PatchEmbed(in_chans, embed_dim, self.patch_size, norm_layer, fold=fold_onsets)
        self.pos_drop = nn.Dropout(drop_rate)
        self.empty_token = nn.Parameter(torch.zeros(embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(embed_dim))

        dims = [embed_dim * 2**i for i in range(self.num_stages)]
        # stochastic depth rises over all blocks (computed on the CPU, so the model also builds on torch.device("meta"))
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        info = []
        grid = self.grid_size
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            stage = SwinStage(dims[max(i - 1, 0)], dims[i], grid, depth, heads, _pair(window_size),
                              downsample=i > 0, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                              attn_drop=attn_drop_rate, drop_path=dpr[sum(depths[:i]):sum(depths[: i + 1])],
                              norm_layer=norm_layer, version=version, pretrained_window_size=pretrained[i])
            grid = stage.output_resolution
            info.append(LevelInfo(grid, dims[i], stage.blocks[0].window_size, (patch_h * 2**i, patch_w * 2**i), f"stages.{i}"))
            self.stages.append(stage)
        self.norm = norm_layer(dims[-1])
        self.level_empty_tokens = nn.ParameterList([nn.Parameter(torch.zeros(d)) for d in dims]) if squash_coarse else None
        # one token per stage boundary: what stage i (>= 1) sees in place of an inter-stage-masked input
        self.stage_mask_tokens = (nn.ParameterList([nn.Parameter(torch.zeros(d)) for d in dims[:-1]])
                                  if inter_stage_mask_ratio > 0 else None)
        self.feature_info = info[::-1]  # coarsest first, like the output levels
        self.time_stage = None
        if time_stage_dim and time_stage_kind == "autocorr":
            self.time_stage = AutocorrTimeStage(dims[::-1], time_stage_dim, time_stage_signals, time_stage_lags)
        elif time_stage_dim:
            self.time_stage = TimeStage(dims[::-1], time_stage_dim, time_stage_depth, time_stage_heads)
        self.set_grad_checkpointing(grad_checkpointing)
        init_weights(self, version)
        for t in (self.empty_token, self.mask_token, *(self.level_empty_tokens or []), *(self.stage_mask_tokens or [])):
            nn.init.normal_(t, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Learned tokens stand in for content; decay would only pull them toward zero."""
        tokens = {"empty_token", "mask_token"}
        for name in ("level_empty_tokens", "stage_mask_tokens"):
            tokens |= {f"{name}.{i}" for i in range(len(getattr(self, name) or []))}
        return tokens | submodule_no_weight_decay(self)

    def layer_ids(self) -> dict[str, int]:
        """Depth of every parameter for layer-wise learning-rate decay (BEiT, https://arxiv.org/abs/2106.08254;
        timm's `group_matcher`): 0 = patch embedding and input tokens, then one id per block in order, a
        stage's patch merging (and inter-stage mask token) with its first block, a level's empty token with
        its last block, the final norm one past the last block, with the heads above the encoder (as in
        BEiT; timm's Swin groups it with the last block)."""
        first, last, n = [], [], 0
        for stage in self.stages:
            first.append(n + 1)
            n += len(stage.blocks)
            last.append(n)
        ids = {}
        for name, _ in self.named_parameters():
            parts = name.split(".")
            if parts[0] == "stages" and parts[2] == "blocks":
                ids[name] = first[int(parts[1])] + int(parts[3])
            elif parts[0] == "stages":  # downsample
                ids[name] = first[int(parts[1])]
            elif parts[0] == "stage_mask_tokens":  # the input of stage i + 1
                ids[name] = first[int(parts[1]) + 1]
            elif parts[0] == "level_empty_tokens":
                ids[name] = last[int(parts[1])]
            elif parts[0] in ("norm", "time_stage"):  # beside the pyramid, above its last block
                ids[name] = n + 1
            else:  # patch_embed, empty_token, mask_token
                ids[name] = 0
        return ids

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every Swin block in the backward pass instead of keeping its activations
        (training only): less memory for about one more forward pass of compute."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

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
            return self.draw_mask(non_empty.flatten(1), mask_ratio).view(B, gh, gw)
        return torch.ones_like(non_empty)

    def draw_mask(self, non_empty: Tensor, mask_ratio: float, generator: torch.Generator | None = None) -> Tensor:
        """(B, N) bool over the patch grid, True = visible: this encoder's kind of mask (SimMIM,
        per sample, empty patches masked `empty_mask_ratio` as often), for callers that fix it."""
        return simmim_mask(non_empty, mask_ratio, self.empty_mask_ratio, generator=generator)

    def run_stages(self, x: Tensor, non_empty: Tensor, visible: Tensor,
                   stage_masking: bool) -> tuple[list[Tensor], list[Tensor]]:
        """NHWC features and non_empty grids of every stage, finest first. Squashing and
        inter-stage masking read `seen`: a masked patch counts as holding notes, so what lies
        under it cannot change which tokens are replaced."""
        seen = non_empty | ~visible  # (B, gh, gw): not known to be empty
        feats, empties = [], []
        for i, stage in enumerate(self.stages):
            if i > 0:
                if stage_masking:
                    x = self._mask_between_stages(x, seen, i)
                non_empty, seen = pool_mask(non_empty, any_of=True), pool_mask(seen, any_of=True)
            x = stage(x)
            if i == self.num_stages - 1:
                x = self.norm(x)
            if self.level_empty_tokens is not None:
                x = apply_mask_token(x, seen, self.level_empty_tokens[i])
            feats.append(x)
            empties.append(non_empty)
        return feats, empties

    def _mask_between_stages(self, x: Tensor, seen: Tensor, i: int) -> Tensor:
        """Replace a fraction inter_stage_mask_ratio / 2**i of stage i's input (B, h, w, D) by its token."""
        B, h, w, _ = x.shape
        ratio = self.inter_stage_mask_ratio / 2**i
        keep = level_mask(seen.flatten(1), ratio, self.empty_mask_ratio).view(B, h, w)
        return apply_mask_token(x, keep, self.stage_mask_tokens[i - 1])

    def forward(self, x: Tensor, mask_ratio: float = 0.0, mae_mask: Tensor | None = None) -> EncoderOutput:
        """x: (B, C, H, W) in [0, 1]; mae_mask: optional (B, N) bool over the patch grid, True = visible."""
        check_roll(x, self.in_chans, self.img_size, type(self).__name__, self.empty_token.dtype)
        tokens, non_empty = self.embed(x)
        visible = self.make_mask(non_empty, mask_ratio, mae_mask)
        masked = mask_ratio > 0 or mae_mask is not None
        if masked:  # skip a full-grid pass when nothing is masked
            tokens = apply_mask_token(tokens, visible, self.mask_token)
        # an augmentation of the masked pretraining branch, not of every training forward
        stage_masking = (self.stage_mask_tokens is not None and self.training
                         and (masked or self.inter_stage_mask_all))
        feats, empties = self.run_stages(tokens, non_empty, visible, stage_masking)
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
        time = self.time_stage(hps) if self.time_stage is not None else None
        return EncoderOutput(hps, finest.pos, finest.non_empty, finest.mae_mask, time)


def _validate(img_height: int, img_width: int, patch_h: int, patch_w: int, embed_dim: int,
              depths: tuple[int, ...], num_heads: tuple[int, ...], mae_ratio: float, version: int) -> None:
    if not depths or len(depths) != len(num_heads):
        raise ValueError(f"depths {depths} and num_heads {num_heads} need one entry per stage, the same number")
    if any(d < 1 for d in depths):
        raise ValueError(f"every stage needs at least one block, got depths {depths}")
    for name, size, patch, pname in (("img_height", img_height, patch_h, "patch_h"), ("img_width", img_width, patch_w, "patch_w")):
        if error := pyramid_error(size, patch, len(depths), f"{name}={size}", pname, f"change {name}, {pname} or the number of stages"):
            raise ValueError(error)
    for i, heads in enumerate(num_heads):
        dim = embed_dim * 2**i
        if dim % heads:
            raise ValueError(f"stage {i} has width embed_dim * 2**{i} = {dim}, not divisible by num_heads[{i}] = {heads}")
    if not 0.0 <= mae_ratio < 1.0:
        raise ValueError(f"mae_ratio must be in [0, 1), got {mae_ratio}")
    if version not in (1, 2):
        raise ValueError(f"version must be 1 (Swin V1 blocks) or 2 (Swin V2 blocks), got {version}")


def _pretrained_windows(sizes: Sequence[int | Sequence[int]] | None, num_stages: int,
                        version: int) -> list[tuple[int, int] | None]:
    """One (h, w) trained window per stage (None: the stage's own window)."""
    if sizes is None:
        return [None] * num_stages
    if version != 2:
        raise ValueError("pretrained_window_sizes applies to Swin V2's position-bias MLP; a V1 encoder's bias tables "
                         "are resized to the new windows instead (swin.resize_position_tables): leave it None")
    windows = [_pair(w) for w in sizes]
    if len(windows) != num_stages or any(len(w) != 2 or min(w) < 1 for w in windows):
        raise ValueError(f"pretrained_window_sizes needs one positive window (int or (h, w)) per stage, "
                         f"{num_stages} in all, finest first; got {list(sizes)}")
    return windows


def stage_windows(img_size: tuple[int, int], patch_size: tuple[int, int], num_stages: int,
                  window_size: int | Sequence[int]) -> list[tuple[int, int]]:
    """The window every stage of a `SwinEncoder` of this geometry runs, finest first: `window_size`
    clamped to the stage's grid, as `feature_info` reports it, known without building the model."""
    grids = pyramid_grids(img_size, patch_size, num_stages)[::-1]
    return [clamp_window(grid, _pair(window_size), (0, 0))[0] for grid in grids]


def resize_position_tables(state: dict[str, Tensor], encoder: SwinEncoder,
                           trained_windows: Sequence[tuple[int, int]]) -> dict[str, Tensor]:
    """`state`, a V1 encoder's weights whose stage i was trained with window `trained_windows[i]`
    (finest first, `stage_windows`), with every relative position bias table resized bicubically to
    the window that block has in `encoder`; the rest as it is. A V2 state dict has no table and
    loads as it is (its encoder is built with `pretrained_window_sizes` instead)."""
    state = dict(state)
    for i, stage in enumerate(encoder.stages):
        for j, blk in enumerate(stage.blocks):
            key = f"stages.{i}.blocks.{j}.attn.relative_position_bias_table"
            if key in state:
                state[key] = resize_relative_position_bias_table(state[key], trained_windows[i], blk.window_size)
    return state


def pyramid_grids(img_size: tuple[int, int], patch_size: tuple[int, int], num_levels: int) -> list[tuple[int, int]]:
    """Token grid of every level, coarsest first: the patch grid halved once per level above it."""
    gh, gw = img_size[0] // patch_size[0], img_size[1] // patch_size[1]
    return [(gh >> (num_levels - 1 - i), gw >> (num_levels - 1 - i)) for i in range(num_levels)]


def check_levels(enc_out: EncoderOutput, grids: list[tuple[int, int]], dims: list[int], who: str) -> None:
    """Raise a ValueError naming the fix unless the hierarchy has the levels a decoder was built for."""
    got = [(lvl.num_patches, lvl.dim) for lvl in enc_out.patches]
    want = [(h * w, d) for (h, w), d in zip(grids, dims)]
    if got != want:
        raise ValueError(f"{who} was built for levels (N, D) {want} (coarsest first) but got {got}; build it with "
                         f"the encoder's img_height, img_width, patch size, embed_dim and number of stages")


def to_grid(emb: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, N, D) row-major tokens -> (B, h, w, D)."""
    return emb.reshape(emb.shape[0], grid[0], grid[1], emb.shape[-1])


def upsample2x(x: Tensor) -> Tensor:
    """(B, h, w, D) -> (B, 2h, 2w, D), every token copied to its 2 x 2 cell (nearest). Nearest
    interpolation of the grid seen as a channels-last NCHW tensor: one pass each way, where a
    broadcast view's backward sums over two interleaved axes (about ten times slower on the CPU)."""
    return F.interpolate(x.permute(0, 3, 1, 2), scale_factor=2, mode="nearest").permute(0, 2, 3, 1)


class SwinMAEDecoder(nn.Module):
    """FPN-style decoder for SimMIM pretraining: every level projected to `decoder_dim`, a top-down
    pathway (2x nearest upsample + add) from the coarsest to the finest grid, a learned "masked"
    embedding added (not substituted, so the coarse context fused from above survives) at masked
    patches when the decoder reads the finest level, a few Swin blocks at the finest grid, and a per-patch head to logits (B, C, H, W)."""

    def __init__(self, img_height: int = 128, img_width: int = 128, patch_h: int = 4, patch_w: int = 4,
                 out_channels: int = 1, embed_dim: int = 8, num_levels: int = 6, decoder_dim: int = 64,
                 depth: int = 2, num_heads: int = 4, window_size: int | Sequence[int] = 8, mlp_ratio: float = 4.0,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, head: str = "linear",
                 read_levels: int | None = None) -> None:
        super().__init__()
        if read_levels is not None and not 1 <= read_levels <= num_levels:  # 0 builds, and fails on the first forward
            raise ValueError(f"read_levels must be 1..{num_levels} (the coarsest levels the decoder reads) or None (all), "
                             f"got {read_levels}")
        self.grids = pyramid_grids((img_height, img_width), (patch_h, patch_w), num_levels)
        # Reading only the coarsest levels forces the content of the roll up into them (the finer
        # levels hold as many floats as the crop has pixels and could otherwise just copy it).
        self.read_levels = num_levels if read_levels is None else read_levels
        self.dims = [embed_dim * 2 ** (num_levels - 1 - i) for i in range(num_levels)]  # coarsest first
        self.lateral = nn.ModuleList([nn.Linear(d, decoder_dim) for d in self.dims[: self.read_levels]])
        # The mask is drawn per patch, and mostly over patches that hold notes (empty ones are masked
        # `empty_mask_ratio` times as often): a finest-grid map of it tells where the notes are. Only a
        # decoder that reads the finest level gets it; one that reads the coarse levels alone must find
        # everything in them.
        self.mask_embed = nn.Parameter(torch.zeros(decoder_dim)) if self.read_levels == num_levels else None
        # Without the finest levels, upsampled coarse tokens are constant over their cell: a learned
        # position embedding on the finest grid tells the blocks where in the cell a patch sits.
        self.pos_embed = (nn.Parameter(torch.zeros(1, *self.grids[-1], decoder_dim))
                          if self.read_levels < num_levels else None)
        self.blocks = SwinStage(decoder_dim, decoder_dim, self.grids[-1], depth, num_heads, _pair(window_size),
                                mlp_ratio=mlp_ratio, norm_layer=norm_layer)
        self.norm = norm_layer(decoder_dim)
        self.head = Unpatchify(decoder_dim, out_channels, (patch_h, patch_w), head)
        init_weights(self, version=2)
        if self.mask_embed is not None:
            nn.init.normal_(self.mask_embed, std=0.02)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return ({"mask_embed"} if self.mask_embed is not None else set()) | submodule_no_weight_decay(self)

    def fuse(self, enc_out: EncoderOutput, levels: Tensor | None = None) -> Tensor:
        """The levels merged top-down onto the finest grid, with the mask (and position) embedding:
        (B, gh, gw, D). levels (B,) int, optional: sample b reads only its levels[b] coarsest levels
        (1..read_levels; the others add nothing), as if the decoder read fewer levels for it."""
        check_levels(enc_out, self.grids, self.dims, type(self).__name__)
        x = None
        for i, grid in enumerate(self.grids):
            lat = to_grid(self.lateral[i](enc_out.patches[i].emb), grid) if i < self.read_levels else 0  # (B, h, w, decoder_dim)
            if levels is not None and i < self.read_levels:
                lat = lat * (levels > i).to(lat.dtype)[:, None, None, None]
            x = lat if x is None else upsample2x(x) + lat
        if self.mask_embed is not None:  # a sample that reads fewer levels (`levels`) gets no mask map either
            masked = ~enc_out.mae_mask.view(x.shape[:3])  # (B, gh, gw)
            if levels is not None:
                masked = masked & (levels == len(self.grids))[:, None, None]
            x = x + masked[..., None] * self.mask_embed
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x

    def forward(self, enc_out: EncoderOutput, levels: Tensor | None = None) -> Tensor:
        return self.head(self.norm(self.blocks(self.fuse(enc_out, levels))))  # (B, C, H, W) logits

    def patch_logits(self, enc_out: EncoderOutput, select: Tensor, levels: Tensor | None = None) -> Tensor:
        """The logits of the patches where select (B, N) bool is True, in row-major order sample
        by sample: (M, C, ph, pw), the same as `forward`'s there. The last block's attention reads
        every token; what follows it (its MLP, the norm, the head) is per token, so it runs on the
        selected tokens alone (a masked-patch loss reads a few percent of a sparse roll)."""
        x = self.fuse(enc_out, levels)
        *blocks, last = self.blocks.blocks  # no downsample, no drop path in the decoder's stage
        for blk in blocks:
            x = blk(x)
        x = last.mix(x)  # (B, gh, gw, D)
        tokens = x.reshape(-1, x.shape[-1])[select.reshape(-1)]  # (M, D)
        return self.head.patch_logits(self.norm(last.ffn(tokens)))


class SwinDecoder(nn.Module):
    """Swin V2 decoder symmetric to the encoder: from the coarsest level to the finest, Swin blocks
    at every scale with PatchExpand between scales, each encoder level fused by a lateral linear
    projection (added). Give it the encoder's config (embed_dim, depths, num_heads, ...), finest
    stage first as for the encoder; it reverses them internally.

    skip_levels: indices (coarsest first) of the encoder levels the decoder may read; None reads
    all. Reading only coarse levels measures how much they alone carry. Levels not read are never
    touched; if level 0 is not read, decoding starts from a learned token.
    width: the decoder's finest-stage width (doubling toward the coarsest), when it should differ
    from the encoder's embed_dim: a decoder that reads few coarse floats has to invent the fine
    detail, and at the encoder's width its own capacity, not the levels, may cap the result.
    """

    def __init__(self, img_height: int = 128, img_width: int = 128, patch_h: int = 4, patch_w: int = 4,
                 out_channels: int = 1, embed_dim: int = 8, depths: Sequence[int] = (1, 2, 2, 6, 2, 1),
                 num_heads: Sequence[int] = (1, 1, 2, 4, 8, 16), window_size: int | Sequence[int] = 8,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.1,
                 proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, skip_levels: Sequence[int] | None = None,
                 head: str = "linear", width: int | None = None) -> None:
        super().__init__()
        depths, num_heads = tuple(depths)[::-1], tuple(num_heads)[::-1]  # coarsest first
        L = len(depths)
        width = width or embed_dim
        check_rates(type(self).__name__, drop_path_rate=drop_path_rate, proj_drop_rate=proj_drop_rate,
                    attn_drop_rate=attn_drop_rate)
        _validate(img_height, img_width, patch_h, patch_w, width, depths[::-1], num_heads[::-1], 0.0, 2)
        self.grids = pyramid_grids((img_height, img_width), (patch_h, patch_w), L)
        self.dims = [embed_dim * 2 ** (L - 1 - i) for i in range(L)]  # the encoder's levels, coarsest first
        dims = [width * 2 ** (L - 1 - i) for i in range(L)]  # the decoder's stages
        self.skip_levels = sorted(set(range(L) if skip_levels is None else skip_levels))
        if not self.skip_levels or not all(0 <= i < L for i in self.skip_levels):
            raise ValueError(f"skip_levels must name at least one of the levels 0..{L - 1} (0 = coarsest), got {skip_levels}")
        self.read_levels = self.skip_levels[-1] + 1  # the levels past it are never read
        self.lateral = nn.ModuleDict({str(i): nn.Linear(self.dims[i], dims[i]) for i in self.skip_levels})
        self.start_token = None if 0 in self.skip_levels else nn.Parameter(torch.zeros(dims[0]))
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList([
            SwinStage(dims[i], dims[i], self.grids[i], depths[i], num_heads[i], _pair(window_size),
                      mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                      drop_path=dpr[sum(depths[:i]):sum(depths[: i + 1])], norm_layer=norm_layer)
            for i in range(L)])
        self.expand = nn.ModuleList([PatchExpand(dims[i], dims[i + 1], norm_layer) for i in range(L - 1)])
        self.norm = norm_layer(dims[-1])
        self.head = Unpatchify(dims[-1], out_channels, (patch_h, patch_w), head)
        init_weights(self, version=2)
        if self.start_token is not None:
            nn.init.normal_(self.start_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return ({"start_token"} if self.start_token is not None else set()) | submodule_no_weight_decay(self)

    def forward(self, enc_out: EncoderOutput, levels: Tensor | None = None) -> Tensor:
        """Logits (B, C, H, W). levels (B,) int, optional: sample b reads only the levels of
        `skip_levels` under levels[b] (1..read_levels; nested dropout during pretraining)."""
        check_levels(enc_out, self.grids, self.dims, type(self).__name__)
        B = enc_out.latent.shape[0]
        x = self.start_token.expand(B, *self.grids[0], -1) if self.start_token is not None else 0
        for i, stage in enumerate(self.stages):
            if str(i) in self.lateral:
                lat = to_grid(self.lateral[str(i)](enc_out.patches[i].emb), self.grids[i])  # (B, h_i, w_i, D_i)
                if levels is not None:
                    lat = lat * (levels > i).to(lat.dtype)[:, None, None, None]
                x = x + lat
            x = stage(x)  # (B, h_i, w_i, D_i)
            if i < len(self.expand):
                x = self.expand[i](x)  # (B, 2h_i, 2w_i, D_i / 2)
        return self.head(self.norm(x))  # (B, C, H, W) logits
