"""Typed configuration: the dataclasses below are the single source of every training option.

YAML presets (`configs/*.yaml`) and dotted command-line overrides (`model.embed_dim=16`) only
set fields that exist here; values are coerced to the field's type and every section checks
itself in `__post_init__`, with a message that says what to change. The resolved config is
written into the run folder (`config.yaml`) and into every checkpoint.
"""
from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from midi_rae.geometry import pyramid_error
from midi_rae.roll import PITCHES

ENCODERS = ("swin", "vit")


class ConfigError(ValueError):
    """A config that cannot train; the message names the field and what to change."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _is_window(w: object) -> bool:
    """A Swin attention window as a config holds it: a positive n or a positive [h, w]."""
    return (isinstance(w, int) and w > 0) or (isinstance(w, list) and len(w) == 2 and min(w) > 0)


def opt(default: Any = None, help: str = "", *, factory: Callable[[], Any] | None = None) -> Any:
    """A config field with its help text in the field's metadata (shown by `--help`, see
    `describe`): `opt(default, help)`, or `opt(factory=list, help=...)` for a mutable default."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    """Where the rolls come from and how crops are drawn (see `dataset.PianoRollDataset`)."""

    cache_dir: str | None = opt(None, "a prepared cache; None: the bundled corpus's default cache")
    paths: list[str] = opt(factory=list, help="sources `midi-rae run` prepares; empty: bundled corpus")
    collections: list[str] | None = opt(None, "bundled corpus only: restrict to these folders")
    crop_width: int = opt(128, "time steps per crop = the encoder's img_width")
    steps_per_beat: int = opt(4, "time steps per quarter note: what `midi-rae run` prepares at, what training requires "
                                 "of its cache, and what `encode` / `reconstruct` read music files at (12: triplets)")
    expand_repeats: bool = opt(True, "`midi-rae run`'s prepare: repeated sections played as written out (MusicXML, "
                                     "kern, ABC); false: each once, as notated")
    channels: int = opt(1, "1: frame only; 2: frame + onset (prepare with onsets, the default)")
    max_time_shift: int = opt(16, "the two views' random offsets (steps / semitones)")
    max_pitch_shift: int = opt(6, "see max_time_shift")
    transpose: int = opt(0, "random transposition of both views, +-semitones (training only)")
    view_mode: str = opt("shift", "the second view: 'shift' (the same passage moved by max_time_shift / "
                                  "max_pitch_shift) or 'piece' (another passage of the same piece, moved by up to "
                                  "max_pitch_shift semitones of its own)")
    crop_starts: str = opt("any", "where a crop starts in its piece: 'any' step, or 'tiles': a multiple of crop_width "
                                  "from the piece start, the windows `encode` and the probes read")
    val_fraction: float = opt(0.05, "pieces held out, by a hash of their work (pieces.jsonl `work`, cache.work_groups)")
    val_max_items: int | None = opt(256, "cap on the fixed validation crops (None: all)")
    num_workers: int = opt(0, "DataLoader workers per process")

    def __post_init__(self) -> None:
        _require(self.crop_width > 0, f"data.crop_width must be positive, got {self.crop_width}")
        _require(self.channels in (1, 2), f"data.channels must be 1 (frame) or 2 (frame + onset), got {self.channels}")
        _require(1 <= self.steps_per_beat <= 96, f"data.steps_per_beat must be in 1..96, got {self.steps_per_beat}")
        _require(0.0 < self.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        _require(self.max_time_shift >= 0 and self.max_pitch_shift >= 0 and self.transpose >= 0,
                 "data.max_time_shift, data.max_pitch_shift and data.transpose must be >= 0")
        _require(self.val_max_items is None or self.val_max_items > 0,
                 f"data.val_max_items must be positive or null (all), got {self.val_max_items}")
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _require(self.view_mode in ("shift", "piece"), f"data.view_mode must be 'shift' or 'piece', got {self.view_mode!r}")
        _require(self.crop_starts in ("any", "tiles"), f"data.crop_starts must be 'any' or 'tiles', got {self.crop_starts!r}")


@dataclass
class ModelConfig:
    """The encoder. `encoder` picks the class; the rest are its constructor arguments.
    img_height is 128 (pitches), img_width is `data.crop_width`, in_chans is `data.channels`."""

    encoder: str = opt("swin", "'swin' (SwinEncoder) or 'vit' (ViTEncoder)")
    patch_h: int = opt(4, "patch height in pitches")
    patch_w: int = opt(4, "patch width in time steps")
    embed_dim: int = opt(8, "swin: width of the finest stage, doubling per stage; vit: the width")
    depths: list[int] = opt(factory=lambda: [1, 2, 2, 6, 2, 1], help="swin: blocks per stage")
    depth: int = opt(4, "vit: number of blocks")
    num_heads: int | list[int] = opt(factory=lambda: [1, 1, 2, 4, 8, 16], help="swin: per stage; vit: one int")
    window_size: int | list[int] = opt(8, "swin: attention window in tokens, n or [pitch, time], clamped to each stage's grid")
    pretrained_window_sizes: list[int | list[int]] | None = opt(None, "swin V2: per stage (finest first), the window (n or [h, w]) the weights were trained at, when they run at another window or crop width (set by runs.transfer_config); null: trained at this geometry")
    mlp_ratio: float = opt(4.0, "MLP hidden width / block width")
    drop_path_rate: float = opt(0.1, "swin: stochastic depth, rising linearly over the blocks to this rate")
    version: int = opt(2, "swin: 2 (V2 blocks) or 1")
    squash_coarse: bool = opt(False, "swin: learned empty token at every level")
    empty_mask_ratio: float = opt(0.05, "empty patches are masked this much less often")
    inter_stage_mask_ratio: float = opt(0.0, "swin: dropout-style masking between stages (ratio / 2**stage) of the masked pretraining forward only, not of LeJEPA views or decoder fine-tuning")
    inter_stage_mask_all: bool = opt(False, "swin: inter-stage masking in every training forward, LeJEPA views and decoder fine-tuning included")
    grad_checkpointing: bool = opt(False, "swin: recompute every block in the backward pass (training only): far less activation memory for about one more forward pass")
    fold_onsets: bool = opt(False, "swin, data.channels=2: the patch embedding reads frame and onset as one value per pixel (0 silent, 0.5 held, 1 onset), so the finest level can still hold the whole roll; the decoders still reconstruct both channels")
    time_stage_dim: int = opt(0, "swin: width of a time stage beside the pyramid (swin.TimeStage): it reads every level's profile over time under stop-gradient, is trained on the crop's descriptors (objective.time_stage_rhythm_weight) and is read by the probes beside the levels; 0: none")
    time_stage_depth: int = opt(2, "its Transformer layers (attention over every column of the crop)")
    time_stage_heads: int = opt(4, "its heads (time_stage_dim must be a multiple)")
    time_stage_kind: str = opt("transformer", "the time stage: 'transformer' (attention over the columns, one token a column) or 'autocorr' (swin.AutocorrTimeStage: learned signals per column and their autocorrelations, one token a crop)")
    time_stage_signals: int = opt(16, "time_stage_kind=autocorr: the signals it correlates")
    time_stage_lags: int = opt(32, "time_stage_kind=autocorr: lags 1..this many finest columns")
    mae_decoder_dim: int = opt(64, "width of the light decoder of masked reconstruction during pretraining")
    mae_decoder_depth: int = opt(2, "its blocks")
    mae_decoder_heads: int = opt(4, "its heads")

    def __post_init__(self) -> None:
        _require(self.encoder in ENCODERS, f"model.encoder must be one of {ENCODERS}, got {self.encoder!r}")
        _require(self.patch_h > 0 and self.patch_w > 0 and self.embed_dim > 0, "model.patch_h, patch_w, embed_dim must be positive")
        _require(_is_window(self.window_size), f"model.window_size must be a positive n or [pitch, time] tokens, got "
                 f"{self.window_size}; e.g. model.window_size=8 or model.window_size=[4,16]")
        _require(0.0 <= self.drop_path_rate < 1.0, f"model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        _require(self.mlp_ratio > 0, f"model.mlp_ratio must be positive, got {self.mlp_ratio}")
        _require(self.mae_decoder_dim > 0 and self.mae_decoder_depth > 0 and self.mae_decoder_heads > 0,
                 "model.mae_decoder_dim, mae_decoder_depth and mae_decoder_heads must be positive")
        _require(self.time_stage_dim == 0 or (self.time_stage_dim > 0 and (
                     self.time_stage_kind != "transformer" or (self.time_stage_depth > 0 and self.time_stage_heads > 0
                                                               and self.time_stage_dim % self.time_stage_heads == 0))),
                 f"model.time_stage_dim must be 0 (none) or a positive multiple of model.time_stage_heads "
                 f"({self.time_stage_heads}), with model.time_stage_depth >= 1; got {self.time_stage_dim}")
        _require(self.time_stage_kind in ("transformer", "autocorr") and self.time_stage_signals > 0
                 and self.time_stage_lags > 0,
                 f"model.time_stage_kind must be 'transformer' or 'autocorr' (got {self.time_stage_kind!r}), with "
                 f"model.time_stage_signals and model.time_stage_lags >= 1")
        all_heads = self.num_heads if isinstance(self.num_heads, list) else [self.num_heads]
        _require(all(h > 0 for h in all_heads), f"model.num_heads must be positive, got {self.num_heads}")
        _require(0.0 <= self.empty_mask_ratio <= 1.0, f"model.empty_mask_ratio must be in [0, 1], got {self.empty_mask_ratio}")
        _require(0.0 <= self.inter_stage_mask_ratio < 1.0,
                 f"model.inter_stage_mask_ratio must be in [0, 1), got {self.inter_stage_mask_ratio}")
        if self.encoder == "swin":
            heads = self.num_heads
            _require(all(d > 0 for d in self.depths), f"model.depths must be positive block counts, got {self.depths}")
            _require(isinstance(heads, list) and len(heads) == len(self.depths) and len(heads) > 0,
                     f"model.num_heads must list one head count per Swin stage, like depths {self.depths}; got {heads}")
            for i, h in enumerate(heads):
                _require((self.embed_dim * 2**i) % h == 0, f"stage {i} has width model.embed_dim * 2**{i} = "
                         f"{self.embed_dim * 2**i}, not divisible by model.num_heads[{i}] = {h}; change one of them")
            _require(self.version in (1, 2), f"model.version must be 1 or 2, got {self.version}")
            pws = self.pretrained_window_sizes
            if pws is not None:
                _require(self.version == 2, "model.pretrained_window_sizes applies to Swin V2 (its position-bias MLP); "
                         "V1 bias tables are resized when loaded at a new window instead: set it to null")
                _require(len(pws) == len(self.depths) and all(_is_window(w) for w in pws),
                    f"model.pretrained_window_sizes needs one positive window (n or [h, w]) per stage, like depths "
                    f"{self.depths}; got {pws}")
        else:
            _require(isinstance(self.num_heads, int), f"model.num_heads must be one int for the ViT encoder, got "
                     f"{self.num_heads}; e.g. model.num_heads=8")
            _require(self.depth > 0, f"model.depth must be positive, got {self.depth}")
            _require(self.embed_dim % self.num_heads == 0 and (self.embed_dim // self.num_heads) % 4 == 0,
                     f"the ViT needs model.embed_dim / model.num_heads = {self.embed_dim}/{self.num_heads} to be a "
                     f"whole multiple of 4 (2D RoPE); change embed_dim or num_heads")
            _require(self.inter_stage_mask_ratio == 0, "model.inter_stage_mask_ratio applies to the Swin encoder only; set it to 0")
            _require(not self.inter_stage_mask_all, "model.inter_stage_mask_all applies to the Swin encoder only; set it to false")
            _require(not self.grad_checkpointing, "model.grad_checkpointing applies to the Swin encoder only; set it to false")
            _require(self.pretrained_window_sizes is None,
                     "model.pretrained_window_sizes applies to the Swin encoder only; set it to null")
        _require(self.mae_decoder_dim % self.mae_decoder_heads == 0,
                 f"model.mae_decoder_dim {self.mae_decoder_dim} must be divisible by model.mae_decoder_heads {self.mae_decoder_heads}")
        if self.encoder == "vit":  # the ViT MAE decoder rotates its heads with 2D RoPE too
            _require((self.mae_decoder_dim // self.mae_decoder_heads) % 4 == 0,
                     f"the ViT MAE decoder needs model.mae_decoder_dim / model.mae_decoder_heads = {self.mae_decoder_dim}/"
                     f"{self.mae_decoder_heads} to be a multiple of 4 (2D RoPE); change one of them")

    @property
    def num_stages(self) -> int:
        return len(self.depths) if self.encoder == "swin" else 2


@dataclass
class ObjectiveConfig:
    """Pretraining losses; the total is the weighted sum, and any weight may be zero."""

    mask_ratio: float = opt(0.5, "SimMIM / MAE masking ratio of the student's view")
    recon_weight: float = opt(1.0, "masked reconstruction through the MAE decoder")
    recon_visible_weight: float = opt(0.0, "also reconstruct visible patches, at this weight")
    pos_weight: float | None = opt(None, "BCE weight of note pixels (sparse rolls), None: 1")
    mep_weight: float = opt(0.0, "masked embedding prediction against an EMA teacher, every level")
    mep_mask_ratio: float = opt(0.4, "the predictor's own masking of the finest level")
    mep_level_mask_scale: float = opt(1.25, "each coarser level masks 1/scale of the next finer")
    mep_normalize_targets: bool = opt(True, "LayerNorm the teacher's targets (I-JEPA)")
    predictor_dim: int = opt(128, "width of the masked embedding predictor")
    predictor_depth: int = opt(2, "its mixing blocks")
    predictor_heads: int = opt(4, "its heads")
    ema_momentum: float = opt(0.996, "teacher momentum at step 0, rising to ema_momentum_end (cosine)")
    ema_momentum_end: float = opt(1.0, "teacher momentum at the last step")
    lejepa_weight: float = opt(0.0, "LeJEPA on the two shifted views, every level")
    lejepa_lambda: float = opt(0.05, "SIGReg share: (1 - lambda) * invariance + lambda * SIGReg")
    sigreg_projections: int = opt(256, "random directions of SIGReg's sliced test")
    anchor_weight: float = opt(0.0, "pull empty-patch embeddings of every level toward 0")
    multiscale_weight: float = opt(0.0, "per-level heads predicting the max-pooled roll")
    multiscale_upsample: int = opt(1, "each multi-scale head predicts this many cells per token side")
    recon_levels: int | None = opt(None, "swin: the MAE decoder reads only this many coarsest levels; None: all")
    recon_decoder: str = opt("fpn", "swin: the decoder of the reconstruction objectives: 'fpn' (SwinMAEDecoder: the "
                                    "levels merged top-down onto the finest grid, model.mae_decoder_* blocks there) or "
                                    "'swin' (SwinDecoder: the encoder mirrored, blocks at every scale, as `midi-rae "
                                    "levels` and train-decoder use)")
    recon_nested: bool = opt(False, "swin: each sample's MAE decoder reads only its k coarsest of those levels, k "
                                    "uniform in 1..recon_levels (nested dropout): each coarse level must stand alone")
    coarse_ae_weight: float = opt(0.0, "swin: the second half of each batch is encoded unmasked and reconstructed "
                                       "(every patch) by a second decoder reading only the coarse_ae_levels coarsest "
                                       "levels; the first half feeds the other objectives (same compute as one pass)")
    coarse_ae_levels: int = opt(2, "the coarsest levels that coarse_ae_weight's decoder reads")
    descriptor_weight: float = opt(0.0, "hand-crafted targets (MaskFeat's HOG, HuBERT's MFCC clusters): a linear head "
                                        "on every level's non-empty mean regresses the crop's music descriptors "
                                        "(midi_rae.descriptors, standardised by running statistics)")
    descriptor_skip_levels: int = opt(0, "swin: the descriptor head skips this many coarsest levels, leaving them to "
                                         "the reconstruction (recon_levels); 0: it reads every level")
    descriptor_rhythm_weight: float = opt(1.0, "the weight of the rhythm descriptors (inter-onset intervals, onset "
                                               "autocorrelation: the metre) in the descriptor loss; the others keep 1")
    descriptor_rhythm_skip_levels: int = opt(0, "swin: the rhythm descriptors are read from every level but this many "
                                                "coarsest (at least descriptor_skip_levels), the others from every "
                                                "level the head reads: the metre on levels the reconstruction leaves "
                                                "alone (recon_levels)")
    time_stage_rhythm_weight: float = opt(4.0, "model.time_stage_dim > 0: the time stage is trained by its own linear "
                                               "head on its mean token to the crop's descriptors (stop-gradient: "
                                               "the pyramid is not shaped by it), the rhythm ones weighted this much")
    isotropy_weight: float = opt(0.0, "SIGReg (LeJEPA) on the shape of the isotropy_levels coarsest levels' non-empty "
                                      "tokens, centred and scaled to unit mean variance: spreads a level over its "
                                      "dimensions (pretraining otherwise collapses the coarse levels onto a few)")
    isotropy_levels: int = opt(2, "the coarsest levels isotropy_weight reads")
    global_weight: float = opt(0.0, "one embedding per view (every level's non-empty mean, concatenated, "
                                    "through a projector MLP), pulled together across the two views")
    global_loss: str = opt("infonce", "'infonce' (SimCLR) or 'lejepa' (invariance + SIGReg)")
    global_temperature: float = opt(0.1, "infonce")
    global_dim: int = opt(128, "projector output")
    global_in_batch: bool = opt(False, "the second view is a training crop of every objective, not only of the "
                                       "global one: each step reads batch_size pieces, two crops each (2 x batch_size "
                                       "crops), and the global objective costs no extra forward")

    def __post_init__(self) -> None:
        _require(0.0 <= self.mask_ratio < 1.0, f"objective.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        weights = {k: getattr(self, k) for k in ("recon_weight", "mep_weight", "lejepa_weight", "anchor_weight",
                                                 "multiscale_weight", "global_weight", "coarse_ae_weight",
                                                 "descriptor_weight", "isotropy_weight")}
        _require(all(w >= 0 for w in weights.values()), f"objective weights must be >= 0, got {weights}")
        _require(0.0 <= self.time_stage_rhythm_weight < math.inf,
                 f"objective.time_stage_rhythm_weight must be >= 0 and finite, got {self.time_stage_rhythm_weight}")
        _require(0.0 <= self.descriptor_rhythm_weight < math.inf,
                 f"objective.descriptor_rhythm_weight must be >= 0 and finite, got {self.descriptor_rhythm_weight}")
        _require(any(w > 0 for w in weights.values()),
                 "every objective weight is 0, so nothing would train; set e.g. objective.recon_weight=1")
        _require(self.coarse_ae_weight == 0 or any(w > 0 for k, w in weights.items() if k != "coarse_ae_weight"),
                 "objective.coarse_ae_weight shares each batch with another objective, and every other weight is 0; "
                 "for a plain coarse autoencoder set objective.mask_ratio=0 objective.recon_visible_weight=1 "
                 "objective.recon_levels=2 instead")
        # mask_ratio 0 with recon_visible_weight > 0 is a plain autoencoder (through the levels
        # the MAE decoder reads, see recon_levels); with both 0 there is nothing to reconstruct.
        _require(self.recon_weight == 0 or self.mask_ratio > 0 or self.recon_visible_weight > 0,
                 "objective.recon_weight > 0 reconstructs masked patches, but objective.mask_ratio is 0; "
                 "set objective.mask_ratio=0.5 (or objective.recon_visible_weight=1 for a plain autoencoder, "
                 "or objective.recon_weight=0)")
        _require(self.mep_weight == 0 or 0 < self.mep_mask_ratio < 1,
                 f"objective.mep_mask_ratio must be in (0, 1), got {self.mep_mask_ratio}")
        _require(0.0 <= self.ema_momentum <= self.ema_momentum_end <= 1.0,
                 f"need 0 <= objective.ema_momentum <= objective.ema_momentum_end <= 1, got "
                 f"{self.ema_momentum}, {self.ema_momentum_end}")
        _require(0.0 <= self.lejepa_lambda <= 1.0, f"objective.lejepa_lambda must be in [0, 1], got {self.lejepa_lambda}")
        _require(self.global_loss in ("infonce", "lejepa"), f"objective.global_loss must be 'infonce' or 'lejepa', "
                 f"got {self.global_loss!r}")
        _require(self.global_temperature > 0 and self.global_dim > 0,
                 "objective.global_temperature and objective.global_dim must be positive")
        _require(not self.global_in_batch or (self.global_weight > 0 and self.lejepa_weight == 0
                                              and self.coarse_ae_weight == 0),
                 "objective.global_in_batch puts both views of the global objective into one batch: it needs "
                 "objective.global_weight > 0, and objective.lejepa_weight=0 and objective.coarse_ae_weight=0 (which "
                 "read the views or the batch their own way)")
        _require(self.recon_levels is None or self.recon_levels > 0,
                 f"objective.recon_levels must be positive or null (all), got {self.recon_levels}")
        _require(self.predictor_dim > 0 and self.predictor_depth > 0 and self.predictor_heads > 0,
                 "objective.predictor_dim, predictor_depth and predictor_heads must be positive")
        _require(self.predictor_dim % self.predictor_heads == 0,
                 f"objective.predictor_dim {self.predictor_dim} must be divisible by objective.predictor_heads {self.predictor_heads}")


@dataclass
class TrainConfig:
    """Optimisation, schedule, logging and checkpoints of one training stage."""

    epochs: int = opt(10, "passes over the training crops (max_steps, when set, wins)")
    max_steps: int | None = opt(None, "stop after this many optimizer steps (the schedule spans them)")
    batch_size: int = opt(32, "per process; the global batch is batch_size * world size")
    lr: float = opt(1e-3, "peak learning rate (AdamW)")
    min_lr: float = opt(1e-5, "end of the cosine decay")
    warmup_steps: int = opt(100, "linear warm-up from 0")
    weight_decay: float = opt(0.05, "not applied to norms, biases, tokens, logit scales, CPB MLPs")
    layer_decay: float | None = opt(None, "layer-wise lr decay (BEiT), e.g. 0.9: each encoder block learns at this times the rate of the one above it, down to the patch embedding; heads and the final norm at lr; null: off")
    betas: list[float] = opt(factory=lambda: [0.9, 0.95], help="AdamW betas")
    clip_grad: float | None = opt(1.0, "max global gradient norm, None: no clipping")
    seed: int = opt(0, "initial weights, batch order, masks and augmentations")
    device: str = opt("auto", "'auto' (cuda if available), 'cpu', 'cuda'")
    amp: bool = opt(True, "bf16 autocast on CUDA (ignored on CPU)")
    threads: int | None = opt(None, "CPU threads per process (torch.set_num_threads); None: torch's default.")
    # On a busy machine 1 thread can be many times faster than 2 (OpenMP threads spin waiting for each other).
    compile: bool = opt(False, "torch.compile the model")
    log_every: int = opt(10, "steps between metrics.jsonl lines")
    eval_every: int = opt(0, "steps between validations; 0: at the end of each epoch")
    ckpt_every: int = opt(100, "steps between checkpoints (always one at the end of each epoch)")
    keep_last: int = opt(3, "step checkpoints kept (the best is kept as well)")
    progress: bool = opt(True, "tqdm bar on rank 0")
    tensorboard: bool = opt(True, "when the tensorboard package is installed")
    wandb: bool = opt(False, "log to Weights & Biases (when installed)")
    wandb_project: str = opt("midi-rae", "its project")
    wandb_mode: str = opt("offline", "'offline' or 'online'")

    def __post_init__(self) -> None:
        _require(self.epochs > 0, f"train.epochs must be positive, got {self.epochs}")
        _require(self.max_steps is None or self.max_steps > 0, f"train.max_steps must be positive or null, got {self.max_steps}")
        _require(self.batch_size > 0, f"train.batch_size must be positive, got {self.batch_size}")
        _require(self.lr > 0 and 0 <= self.min_lr <= self.lr, f"need train.lr > 0 and 0 <= train.min_lr <= train.lr, "
                 f"got lr={self.lr}, min_lr={self.min_lr}")
        _require(self.warmup_steps >= 0 and self.weight_decay >= 0, "train.warmup_steps and train.weight_decay must be >= 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"train.betas must be two numbers in [0, 1), got {self.betas}")
        _require(self.layer_decay is None or 0 < self.layer_decay <= 1,
                 f"train.layer_decay must be in (0, 1] (e.g. 0.9) or null (off), got {self.layer_decay}")
        _require(self.clip_grad is None or self.clip_grad > 0, f"train.clip_grad must be positive or null, got {self.clip_grad}")
        _require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                 f"train.device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        for name in ("log_every", "ckpt_every", "keep_last"):
            _require(getattr(self, name) > 0, f"train.{name} must be positive, got {getattr(self, name)}")
        _require(self.threads is None or self.threads > 0, f"train.threads must be positive or null, got {self.threads}")
        _require(self.eval_every >= 0, f"train.eval_every must be >= 0, got {self.eval_every}")
        _require(self.wandb_mode in ("offline", "online"), f"train.wandb_mode must be 'offline' or 'online', got {self.wandb_mode!r}")


@dataclass
class DecoderConfig:
    """The decoder trained on the (frozen) encoder's pyramid: SwinDecoder or ViTDecoder,
    following the encoder type. Depths and heads default to the encoder's."""

    depths: list[int] | None = opt(None, "swin: finest stage first, like the encoder; None: the encoder's")
    num_heads: list[int] | None = opt(None, "swin: per stage, finest first; None: the encoder's")
    depth: int = opt(2, "vit decoder blocks")
    decoder_dim: int = opt(128, "vit decoder width")
    vit_heads: int = opt(4, "vit decoder heads")
    skip_levels: list[int] | None = opt(None, "swin: encoder levels the decoder reads (0 = coarsest); None: all")
    embed_dim: int | None = opt(None, "swin: width of the decoder's finest stage, doubling toward the coarsest; "
                                      "None: the encoder's model.embed_dim")
    head: str = opt("linear", "unpatchify head: 'linear', 'pixelshuffle' or 'convtranspose'")
    drop_path_rate: float = opt(0.0, "stochastic depth of the decoder")
    finetune_encoder: bool = opt(False, "train the encoder too, at lr * encoder_lr_scale")
    encoder_lr_scale: float = opt(0.1, "the encoder's lr factor when fine-tuned")
    pos_weight: float | None = opt(None, "BCE weight of note pixels")
    threshold: float = opt(0.5, "probability above which a pixel counts as a note in the metrics")

    def __post_init__(self) -> None:
        _require(self.head in ("linear", "pixelshuffle", "convtranspose"),
                 f"decoder.head must be 'linear', 'pixelshuffle' or 'convtranspose', got {self.head!r}")
        _require(0.0 < self.threshold < 1.0, f"decoder.threshold must be in (0, 1), got {self.threshold}")
        _require(self.encoder_lr_scale > 0, f"decoder.encoder_lr_scale must be positive, got {self.encoder_lr_scale}")
        _require(0.0 <= self.drop_path_rate < 1.0, f"decoder.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        _require(self.depth > 0 and self.decoder_dim > 0 and self.vit_heads > 0,
                 "decoder.depth, decoder.decoder_dim and decoder.vit_heads must be positive")
        _require(all(n > 0 for n in (self.depths or []) + (self.num_heads or [])),
                 f"decoder.depths and decoder.num_heads must be positive, got {self.depths} and {self.num_heads}")
        _require((self.depths is None) == (self.num_heads is None) and (self.depths is None or len(self.depths) == len(self.num_heads)),
                 "set decoder.depths and decoder.num_heads together, one entry per stage (or leave both null)")


@dataclass
class FinetuneConfig:
    """Supervised fine-tuning (`midi-rae finetune`): the encoder plus a classification head (one
    level pooled, LayerNorm, Linear) trained on a label of the cache metadata, split grouped by
    piece as the probe suite splits it (`labels.find_tasks`), so the two score the same test crops."""

    label: str = opt("collection", "the metadata label to predict (collection, composer, time_signature, mode, "
                                   "source_set, or another metadata key)")
    classes: list[str] | None = opt(None, "label values to keep; None: the most frequent (max_classes)")
    level: int | None = opt(0, "the level the head pools (0 = coarsest, the last stage's output); null: every level, "
                                "each pooled and normalised on its own, concatenated (the probe's headline features)")
    pool: str = opt("mean", "'mean' over all tokens of the level, or 'non-empty' (tokens with notes)")
    label_smoothing: float = opt(0.1, "cross-entropy label smoothing")
    balance: bool = opt(True, "weight the cross-entropy by the inverse share of each class among the training crops: "
                              "a piece gives crops in proportion to its length, so without it long pieces' classes "
                              "dominate, while the balanced accuracy (and the probe's fixed crops) count pieces")
    train_crops: str = opt("random", "'random': crops drawn anywhere in the training pieces, a new draw each epoch; "
                                     "'start': the fixed crops from each training piece's start (test_crops_per_piece of "
                                     "them), those the probe fits its head on and cut as the test crops are")
    batch_norm: bool = opt(False, "a BatchNorm without affine between the pooled features and the Linear (as MAE's "
                                  "linear probe): the head reads features standardised over the batch, so a common "
                                  "drift of the encoder's output is taken out, not amplified by the probe's weights")
    head_init: str = opt("probe", "'probe': the head starts as the linear probe (L-BFGS, L2 chosen on a grouped hold-out) "
                                  "of the initial encoder's features of the training pieces' fixed crops, then all is "
                                  "fine-tuned (LP-FT, https://arxiv.org/abs/2202.10054); 'random': truncated normal")
    scratch: bool = opt(False, "train the encoder from its random initialisation (the baseline), not the run's weights")
    val_fraction: float = opt(0.1, "share of the training pieces held out (grouped by work) to validate and pick the best checkpoint")
    test_fraction: float | None = opt(None, "share of pieces on the test side; None: data.val_fraction (the pieces pretraining never saw)")
    max_classes: int = opt(8, "the most frequent classes kept")
    max_pieces_per_class: int = opt(150, "training pieces per class (test: a quarter), as the probe suite picks them")
    min_pieces: int = opt(20, "training pieces a class needs (test: a fifth, at least 2)")
    test_crops_per_piece: int = opt(4, "fixed test crops per piece (the probe suite's crops_per_piece)")

    def __post_init__(self) -> None:
        _require(self.level is None or self.level >= 0, f"finetune.level must be >= 0 (0 = coarsest) or null (all levels), got {self.level}")
        _require(self.pool in ("mean", "non-empty"), f"finetune.pool must be 'mean' or 'non-empty', got {self.pool!r}")
        _require(self.train_crops in ("random", "start"), f"finetune.train_crops must be 'random' or 'start', got {self.train_crops!r}")
        _require(self.head_init in ("probe", "random"), f"finetune.head_init must be 'probe' or 'random', got {self.head_init!r}")
        _require(0.0 <= self.label_smoothing < 1.0, f"finetune.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _require(0.0 < self.val_fraction < 1.0, f"finetune.val_fraction must be in (0, 1), got {self.val_fraction}")
        _require(self.test_fraction is None or 0.0 < self.test_fraction < 1.0,
                 f"finetune.test_fraction must be in (0, 1) or null, got {self.test_fraction}")
        _require(self.max_classes >= 2, f"finetune.max_classes must be >= 2, got {self.max_classes}")
        _require(self.max_pieces_per_class > 0 and self.min_pieces > 0 and self.test_crops_per_piece > 0,
                 "finetune.max_pieces_per_class, min_pieces and test_crops_per_piece must be positive")


@dataclass
class Config:
    name: str = opt("run", "run folder name under out_dir")
    out_dir: str = opt("runs", "run folders are <out_dir>/<name>/")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = opt(factory=TrainConfig, help="encoder pretraining")
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    decoder_train: TrainConfig = opt(factory=TrainConfig, help="decoder training")
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    finetune_train: TrainConfig = opt(factory=lambda: TrainConfig(lr=1e-4, warmup_steps=50, layer_decay=0.75),
                                      help="fine-tuning (`midi-rae finetune`)")

    def __post_init__(self) -> None:
        # The run folder is out_dir/name: a name that climbs out of out_dir or nests would write elsewhere.
        _require(bool(self.name) and not any(c in self.name for c in "/\\\0") and self.name not in (".", ".."),
                 f"name must be a plain folder name (no '/', not '.' or '..'), got {self.name!r}; e.g. name=my_run")
        m, d = self.model, self.data
        if m.encoder == "swin":
            for what, size, patch, pname in (("128 pitches", PITCHES, m.patch_h, "patch_h"),
                                             (f"data.crop_width={d.crop_width}", d.crop_width, m.patch_w, "patch_w")):
                error = pyramid_error(size, patch, len(m.depths), what, f"model.{pname}", f"change model.{pname}, the "
                                      f"number of stages (model.depths / model.num_heads) or data.crop_width")
                _require(error is None, error or "")
        else:
            _require(PITCHES % m.patch_h == 0 and d.crop_width % m.patch_w == 0,
                     f"128 pitches x data.crop_width={d.crop_width} must be whole {m.patch_h}x{m.patch_w} patches; "
                     f"change model.patch_h / model.patch_w or data.crop_width")
        _require(m.time_stage_dim == 0 or m.encoder == "swin",
                 f"model.time_stage_dim reads the Swin pyramid's levels over time: it needs model.encoder=swin, "
                 f"got {m.encoder}; set model.time_stage_dim=0")
        _require(not m.fold_onsets or (m.encoder == "swin" and d.channels == 2),
                 f"model.fold_onsets folds the onset channel into the frame channel: it needs model.encoder=swin and "
                 f"data.channels=2, got {m.encoder} and {d.channels}; set those or model.fold_onsets=false")
        dc = self.decoder
        if m.encoder == "swin" and dc.num_heads is not None:
            for i, h in enumerate(dc.num_heads):  # the decoder's stage i has the encoder's width there
                _require((m.embed_dim * 2**i) % h == 0, f"decoder stage {i} has width model.embed_dim * 2**{i} = "
                         f"{m.embed_dim * 2**i}, not divisible by decoder.num_heads[{i}] = {h}; change one of them")
        if m.encoder == "vit":
            _require(dc.decoder_dim % dc.vit_heads == 0 and (dc.decoder_dim // dc.vit_heads) % 4 == 0,
                     f"the ViT decoder needs decoder.decoder_dim / decoder.vit_heads = {dc.decoder_dim}/{dc.vit_heads} "
                     f"to be a whole multiple of 4 (2D RoPE); change decoder_dim or vit_heads")
        if dc.depths is not None:
            _require(len(dc.depths) == m.num_stages, f"decoder.depths needs {m.num_stages} entries (one per encoder "
                     f"stage), got {dc.depths}; or set it to null to mirror the encoder")
        if dc.skip_levels is not None:
            _require(all(0 <= i < m.num_stages for i in dc.skip_levels) and dc.skip_levels,
                     f"decoder.skip_levels must name levels 0..{m.num_stages - 1} (0 = coarsest), got {dc.skip_levels}")
            _require(m.encoder == "swin", "decoder.skip_levels applies to the Swin decoder only; set it to null")
        _require(self.objective.lejepa_weight == 0 or d.view_mode == "shift",
                 "objective.lejepa_weight compares aligned positions of two shifted views; set data.view_mode=shift "
                 "(or use objective.global_weight with data.view_mode=piece)")
        levels = m.num_stages
        _require(self.finetune.level is None or self.finetune.level < levels, f"finetune.level={self.finetune.level} "
                 f"(--level) is out of range: this encoder has {levels} levels, 0 (coarsest) to {levels - 1} (finest); "
                 f"choose one of them, or null (--level all) for every level")
        o = self.objective
        if o.coarse_ae_weight > 0:
            _require(m.encoder == "swin" and 1 <= o.coarse_ae_levels <= m.num_stages,
                     f"objective.coarse_ae_levels must be 1..{m.num_stages} (Swin levels), got {o.coarse_ae_levels} "
                     f"for the {m.encoder} encoder; or set objective.coarse_ae_weight=0")
            _require(self.train.batch_size >= 2, "objective.coarse_ae_weight splits each batch in two; set "
                     f"train.batch_size >= 2 (got {self.train.batch_size})")
        rl = o.recon_levels
        if rl is not None:
            _require(m.encoder == "swin" and rl <= m.num_stages, f"objective.recon_levels must be 1..{m.num_stages} "
                     f"(Swin levels) or null, got {rl} for the {m.encoder} encoder")
        _require(o.descriptor_skip_levels == 0 or (m.encoder == "swin" and 0 < o.descriptor_skip_levels < m.num_stages),
                 f"objective.descriptor_skip_levels must leave the descriptor head a level: 0..{m.num_stages - 1} "
                 f"with the Swin encoder (0 with any other), got {o.descriptor_skip_levels} for {m.encoder}")
        rs = o.descriptor_rhythm_skip_levels
        _require(rs == 0 or (m.encoder == "swin" and o.descriptor_skip_levels <= rs < m.num_stages),
                 f"objective.descriptor_rhythm_skip_levels must leave the rhythm descriptors a level the head reads: "
                 f"{o.descriptor_skip_levels}..{m.num_stages - 1} with the Swin encoder (0 with any other), got {rs} "
                 f"for {m.encoder}")
        _require(o.recon_decoder == "fpn" or (o.recon_decoder == "swin" and m.encoder == "swin"),
                 f"objective.recon_decoder must be 'fpn' or 'swin' (the latter with model.encoder=swin), got "
                 f"{o.recon_decoder!r} for the {m.encoder} encoder")
        _require(o.isotropy_weight == 0 or 1 <= o.isotropy_levels <= m.num_stages,
                 f"objective.isotropy_levels must be 1..{m.num_stages} (this encoder's levels), got {o.isotropy_levels}; "
                 f"or set objective.isotropy_weight=0")
        _require(not o.recon_nested or (m.encoder == "swin" and o.recon_weight > 0),
                 f"objective.recon_nested drops the Swin MAE decoder's finer levels per sample; it needs "
                 f"model.encoder=swin and objective.recon_weight > 0 (got {m.encoder}, {o.recon_weight}); "
                 f"or set objective.recon_nested=false")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


# ----------------------------------------------------------------------------- building from dicts


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` (from YAML or a command-line string) as type `tp`, or a ConfigError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if origin is list:
        if isinstance(value, str):
            text = value.strip()
            try:
                value = yaml.safe_load(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
            except yaml.YAMLError:
                raise ConfigError(f"{key}: {text!r} is not a list; write it as {key}=[1,2,3]") from None
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list (e.g. {key}=[1,2,3]), got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _unknown(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f"; did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (valid here: {', '.join(valid)})")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, coercing types; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in valid:
            raise _unknown(prefix + key, valid)
        tp = hints[key]
        if is_dataclass(tp):
            kwargs[key] = from_dict(tp, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: str) -> None:
    """tree[a][b][c] = value for key 'a.b.c' (as a raw string, coerced later), checking the path."""
    cls: type = Config
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise _unknown(".".join(parts[: i + 1]), [f.name for f in fields(cls)])
        tp = hints[part]
        last = i == len(parts) - 1
        if is_dataclass(tp):
            if last:
                raise ConfigError(f"{key!r} is a section, not a value; set one of its fields, e.g. {key}.{fields(tp)[0].name}=...")
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
            cls = tp
        elif not last:
            raise ConfigError(f"{'.'.join(parts[: i + 1])!r} is a value, not a section; drop '.{'.'.join(parts[i + 1:])}'")
        else:
            node[part] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A YAML file or preset name (None: the defaults) with dotted `key=value` overrides applied, validated."""
    tree: dict[str, Any] = {}
    if path is not None:
        given, path = path, resolve_config_path(str(path))
        if not path.exists():
            presets = ", ".join(p.stem for p in sorted(preset_dir().glob("*.yaml")))
            raise ConfigError(f"config file {str(given)!r} not found; give a path or a preset name ({presets})")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:  # safe_load refuses tags like !!python/object
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or " ".join(str(e).split())
            raise ConfigError(f"config file {str(path)!r} is not plain YAML{where}: {problem}; fix it, or start "
                              f"from a preset (midi-rae train --print-config)") from None
    return _with_overrides(tree, overrides)


def with_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """`cfg` (e.g. a run's own, read from its weights) with dotted `key=value` overrides applied, validated."""
    return _with_overrides(cfg.to_dict(), overrides)


def _with_overrides(tree: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> Config:
    if not isinstance(tree, dict):  # overrides need sections to go into
        raise ConfigError(f"config must be a mapping of keys to values, got {tree!r}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.lr=3e-4")
        key, value = item.split("=", 1)
        _set_dotted(tree, key.strip(), value.strip())
    try:
        return from_dict(Config, tree)
    except TypeError as e:  # a field given as a section or similar
        raise ConfigError(str(e)) from None


def preset_dir() -> Path:
    """The presets: `midi_rae/configs` in a regular install, `configs/` of the source tree otherwise."""
    installed = Path(__file__).resolve().parent / "configs"
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(name_or_path: str | None) -> Path | None:
    """A YAML path as given, or a preset name ('quickstart') looked up in `configs/`."""
    if name_or_path is None:
        return None
    p = Path(name_or_path)
    if p.exists() or p.suffix in (".yaml", ".yml"):
        return p
    return preset_dir() / f"{name_or_path}.yaml"


def describe() -> str:
    """Every config field with its default and its help text (field metadata), for `--help`."""
    def line(name: str, f: Any, default: Any) -> str:
        note = f.metadata.get("help", "")
        return f"  {name} = {default!r}" + (f"  # {note}" if note else "")

    hints = typing.get_type_hints(Config)
    lines = [line(f.name, f, getattr(Config(), f.name)) for f in fields(Config) if not is_dataclass(hints[f.name])]
    for f in fields(Config):
        tp = hints[f.name]
        if is_dataclass(tp):
            about = f.metadata.get("help")
            lines.append(f"{f.name}.*  ({tp.__name__}{': ' + about if about else ''})")
            lines += [line(f"{f.name}.{g.name}", g, getattr(tp(), g.name)) for g in fields(tp)]
    return "\n".join(lines)