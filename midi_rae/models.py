"""Models built from a `Config`: plain factory functions, and the two training wrappers whose
`forward(batch)` returns `(loss, parts)` (as MAE's model returns its loss), so the engine does
not care which objectives are on.

- `Pretrainer`: encoder + whichever heads the objective weights switch on (MAE decoder,
  masked-embedding predictor with an EMA teacher, multi-scale heads, projector, descriptor
  head); LeJEPA and the anchor loss need no head.
- `DecoderTrainer`: a frozen (or fine-tuned) encoder and a full decoder trained to
  reconstruct the roll.
- `Classifier`: the encoder and a classification head on one pooled level, fine-tuned together.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from midi_rae.config import Config
from midi_rae.core import EncoderOutput
from midi_rae.descriptors import NAMES as DESCRIPTOR_NAMES
from midi_rae.descriptors import RHYTHM
from midi_rae.descriptors import descriptors
from midi_rae.losses import (anchor_loss, info_nce, isotropy_loss, lejepa_global, lejepa_loss, masked_recon_loss, mep_loss,
                             multiscale_recon_loss, patch_recon_loss, patches_at, recon_bce)
from midi_rae.masking import patch_non_empty
from midi_rae.predictor import MultiScaleReconHeads, SwinMaskedEmbeddingPredictor, positions
from midi_rae.roll import PITCHES
from midi_rae.swin import SwinDecoder, SwinEncoder, SwinMAEDecoder
from midi_rae.utils import init_linears
from midi_rae.vit import ViTDecoder, ViTEncoder, ViTMAEDecoder


def encoder_kwargs(cfg: Config) -> dict:
    """Constructor arguments of the configured encoder."""
    m, d = cfg.model, cfg.data
    common = dict(img_height=PITCHES, img_width=d.crop_width, patch_h=m.patch_h, patch_w=m.patch_w,
                  in_chans=d.channels, embed_dim=m.embed_dim, mlp_ratio=m.mlp_ratio,
                  mae_ratio=cfg.objective.mask_ratio, empty_mask_ratio=m.empty_mask_ratio)
    if m.encoder == "vit":
        return dict(common, depth=m.depth, num_heads=m.num_heads)
    kw = dict(common, depths=tuple(m.depths), num_heads=tuple(m.num_heads), window_size=m.window_size,
              drop_path_rate=m.drop_path_rate, squash_coarse=m.squash_coarse,
              inter_stage_mask_ratio=m.inter_stage_mask_ratio, inter_stage_mask_all=m.inter_stage_mask_all,
              version=m.version, grad_checkpointing=m.grad_checkpointing,
              pretrained_window_sizes=m.pretrained_window_sizes, fold_onsets=m.fold_onsets,
              time_stage_dim=m.time_stage_dim, time_stage_depth=m.time_stage_depth, time_stage_heads=m.time_stage_heads,
              time_stage_kind=m.time_stage_kind, time_stage_signals=m.time_stage_signals,
              time_stage_lags=m.time_stage_lags)
    return kw


def build_encoder(cfg: Config) -> nn.Module:
    cls = SwinEncoder if cfg.model.encoder == "swin" else ViTEncoder
    kw = encoder_kwargs(cfg)
    unknown = set(kw) - set(inspect.signature(cls).parameters)
    if unknown:
        raise ValueError(f"{cls.__name__} does not accept {sorted(unknown)}; set those model fields to their defaults")
    return cls(**kw)


def build_mae_decoder(cfg: Config, read_levels: int | None = None) -> nn.Module:
    """The lightweight decoder of masked reconstruction during pretraining; read_levels (Swin):
    the coarsest levels it reads, None: `objective.recon_levels`."""
    m, d = cfg.model, cfg.data
    if m.encoder == "vit":
        return ViTMAEDecoder(PITCHES, d.crop_width, m.patch_h, m.patch_w, d.channels, m.embed_dim,
                             m.mae_decoder_dim, m.mae_decoder_depth, m.mae_decoder_heads)
    if cfg.objective.recon_decoder == "swin":  # the encoder mirrored: the decoder `midi-rae levels` trains
        read = read_levels or cfg.objective.recon_levels or len(m.depths)
        return swin_decoder(cfg, skip_levels=list(range(read)))
    return SwinMAEDecoder(PITCHES, d.crop_width, m.patch_h, m.patch_w, d.channels, m.embed_dim, len(m.depths),
                          m.mae_decoder_dim, m.mae_decoder_depth, m.mae_decoder_heads, m.window_size,
                          read_levels=read_levels or cfg.objective.recon_levels)


def level_dims(encoder: nn.Module) -> list[int]:
    """Width of each level of the encoder's output, coarsest first."""
    return [info.dim for info in encoder.feature_info]


def build_predictor(cfg: Config, encoder: nn.Module) -> SwinMaskedEmbeddingPredictor:
    o = cfg.objective
    return SwinMaskedEmbeddingPredictor(level_dims(encoder), summary_dim=o.predictor_dim, mix_depth=o.predictor_depth,
                                        heads=o.predictor_heads, mask_ratio=o.mep_mask_ratio,
                                        level_mask_scale=o.mep_level_mask_scale)


def build_decoder(cfg: Config) -> nn.Module:
    """The full decoder trained by `midi-rae train-decoder`."""
    m, d, dc = cfg.model, cfg.data, cfg.decoder
    if m.encoder == "vit":
        return ViTDecoder(PITCHES, d.crop_width, m.patch_h, m.patch_w, d.channels, m.embed_dim, dc.decoder_dim,
                          dc.depth, dc.vit_heads, head=dc.head)
    return swin_decoder(cfg, depths=dc.depths, num_heads=dc.num_heads, drop_path_rate=dc.drop_path_rate,
                        skip_levels=dc.skip_levels, head=dc.head, width=dc.embed_dim)


def swin_decoder(cfg: Config, depths: list[int] | None = None, num_heads: list[int] | None = None,
                 drop_path_rate: float = 0.0, **kw) -> SwinDecoder:
    """The SwinDecoder mirroring the config's encoder (its depths and heads unless given)."""
    m, d = cfg.model, cfg.data
    return SwinDecoder(PITCHES, d.crop_width, m.patch_h, m.patch_w, d.channels, m.embed_dim,
                       depths=tuple(depths or m.depths), num_heads=tuple(num_heads or m.num_heads),
                       window_size=m.window_size, mlp_ratio=m.mlp_ratio, drop_path_rate=drop_path_rate, **kw)


def align_levels(out1: EncoderOutput, out2: EncoderOutput, shift1: Tensor, shift2: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """View 2's tokens moved onto view 1's grid, level by level.

    shift_k (B, 2) = (dt, dp): view k shows the anchor crop dp semitones up, starting dt steps
    later, so view 1's content at (row, col) sits in view 2 at (row + dp2 - dp1, col - (dt2 - dt1)).
    On a level of `downsample` pixels per token the offset is rounded to whole tokens (coarse
    levels then compare the same cells, which hold nearly the same music). Returns (aligned,
    valid): aligned[i] (B, N_i, D_i), valid[i] (B, N_i) bool, True where the position exists in both.
    """
    d = (shift2 - shift1).to(out1.latent.device).float()  # (B, 2) = (dt, dp)
    aligned, valid = [], []
    for lvl1, lvl2, info in zip(out1.patches, out2.patches, out1.patches.info, strict=True):
        (h, w), (sh, sw) = info.grid_size, info.downsample
        r = lvl1.pos[:, 0] + torch.round(d[:, 1:2] / sh).long()  # (B, N)
        c = lvl1.pos[:, 1] + torch.round(-d[:, 0:1] / sw).long()
        ok = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        idx = r.clamp(0, h - 1) * w + c.clamp(0, w - 1)  # (B, N) row-major index into view 2
        aligned.append(lvl2.emb.gather(1, idx[..., None].expand(-1, -1, lvl2.dim)))
        valid.append(ok)
    return aligned, valid


def lejepa_shifted(out1: EncoderOutput, out2: EncoderOutput, shift1: Tensor, shift2: Tensor,
                   lam: float, num_projections: int) -> Tensor:
    """LeJEPA (`losses.lejepa_loss`) on two shifted views: invariance on the positions both views
    hold once view 2 is re-indexed onto view 1's grid (`align_levels`), SIGReg on every token of both."""
    aligned, valid = align_levels(out1, out2, shift1, shift2)
    return lejepa_loss(out1.patches.all_emb, out2.patches.all_emb, lam, valid, num_projections, aligned=aligned)


def pooled_levels(out: EncoderOutput, skip: int = 0) -> Tensor:
    """(B, sum of the level dims from level `skip` on): those levels' non-empty means,
    concatenated (the probes' 'all non-empty' features), what the global and descriptor heads read."""
    return torch.cat([lvl.pooled() for lvl in out.patches[skip:]], dim=-1)


class Projector(nn.Module):
    """The head of the global objective: every level's non-empty mean, concatenated, through a
    two-layer MLP (SimCLR's projector; the probes read the encoder's features, not this head)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, out: EncoderOutput) -> Tensor:
        return self.mlp(pooled_levels(out))  # (B, out_dim)


class DescriptorHead(nn.Module):
    """The head of the descriptor objective: every level's non-empty mean but the `skip`
    coarsest, concatenated, through one Linear to the crop's hand-crafted music descriptors
    (`midi_rae.descriptors`). Linear, so what it reads is linearly in the features the probes fit
    on. Skipping the coarse levels leaves them to the reconstruction, whose notes the targets
    otherwise displace there. The targets are standardised by running statistics (buffers, so a
    resumed run continues with them): the descriptors mix histograms summing to 1 with pitches in
    [0, 1] and polyphony counts. `rhythm_weight` scales the squared errors of the rhythm features
    (`descriptors.RHYTHM`), the others keep weight 1; `rhythm_skip` (>= skip) coarsest levels are
    hidden from the rhythm features alone (their weights masked to zero), so that the metre is
    asked of the finer levels while the pitch content is asked of every level the head reads."""

    def __init__(self, level_dims: list[int], skip: int = 0, momentum: float = 0.01, eps: float = 1e-4,
                 rhythm_weight: float = 1.0, rhythm_skip: int = 0) -> None:
        super().__init__()
        self.skip = skip
        self.linear = nn.Linear(sum(level_dims[skip:]), len(DESCRIPTOR_NAMES))
        weight = torch.ones(len(DESCRIPTOR_NAMES))
        weight[RHYTHM] = rhythm_weight
        self.register_buffer("feature_weight", weight, persistent=False)  # (F,), from the config, not the weights file
        # (F, D): 0 where a rhythm feature would read one of the rhythm_skip coarsest levels; None when nothing is hidden
        hidden = sum(level_dims[skip:max(skip, rhythm_skip)])
        mask = torch.ones_like(self.linear.weight)
        mask[RHYTHM, :hidden] = 0.0
        self.register_buffer("weight_mask", mask if hidden else None, persistent=False)
        self.momentum, self.eps = momentum, eps
        self.register_buffer("target_mean", torch.zeros(len(DESCRIPTOR_NAMES)))
        self.register_buffer("target_var", torch.ones(len(DESCRIPTOR_NAMES)))
        self.register_buffer("seen", torch.tensor(False))

    def features(self, out: EncoderOutput) -> Tensor:
        """(B, D): what the head reads."""
        return pooled_levels(out, self.skip)

    def loss(self, out: EncoderOutput, x: Tensor, raw: Tensor | None = None) -> Tensor:
        """Mean (feature-weighted) squared error of the standardised descriptors of x (B, C, H, W), the full
        crops; `raw`: their descriptors (B, F) when the caller has them already."""
        with torch.no_grad():
            target = (descriptors(x) if raw is None else raw).to(x.device)  # (B, F), computed on the CPU
            if self.training:
                mean, var = target.mean(0), target.var(0, unbiased=False)
                rate = self.momentum if self.seen else 1.0  # the first batch sets the statistics
                self.target_mean.lerp_(mean, rate)
                self.target_var.lerp_(var, rate)
                self.seen.fill_(True)
            target = (target - self.target_mean) / (self.target_var + self.eps).sqrt()
        weight = self.linear.weight if self.weight_mask is None else self.linear.weight * self.weight_mask  # (F, D)
        pred = F.linear(self.features(out), weight, self.linear.bias)  # (B, F)
        return ((pred.float() - target) ** 2 * self.feature_weight).mean()


class TimeDescriptorHead(DescriptorHead):
    """The time stage's objective (`swin.TimeStage`): its own linear head on the mean of its
    tokens regresses the crop's descriptors, the rhythm ones weighted `rhythm_weight`. The stage
    reads the pyramid under stop-gradient, so this loss trains the stage alone."""

    def __init__(self, dim: int, rhythm_weight: float) -> None:
        super().__init__([dim], rhythm_weight=rhythm_weight)

    def features(self, out: EncoderOutput) -> Tensor:
        return out.time.pooled(non_empty_only=False)


def clear_attention_caches(module: nn.Module) -> None:
    """Drop cached position biases: weights changed in place (EMA) would leave them stale."""
    for m in module.modules():
        if hasattr(m, "clear_cache"):
            m.clear_cache()


@dataclass
class MaskedReconstruction:
    """What validation scores of the SimMIM / MAE objective under a fixed mask."""

    logits: Tensor  # (B, C, H, W)
    visible: Tensor  # (B, N) bool over the patch grid, True = visible
    patch_size: tuple[int, int]
    loss: Tensor  # the masked-patch reconstruction loss (no visible-patch term)


class Pretrainer(nn.Module):
    """The encoder with the heads of the objectives whose weight is non-zero."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        o = self.objective = cfg.objective
        self.encoder = build_encoder(cfg)
        self.patch_size = (cfg.model.patch_h, cfg.model.patch_w)
        self.mae_decoder = build_mae_decoder(cfg) if o.recon_weight > 0 else None
        self.coarse_decoder = build_mae_decoder(cfg, o.coarse_ae_levels) if o.coarse_ae_weight > 0 else None
        self.predictor = build_predictor(cfg, self.encoder) if o.mep_weight > 0 else None
        self.ms_heads = (MultiScaleReconHeads(level_dims(self.encoder), cfg.data.channels, o.multiscale_upsample)
                         if o.multiscale_weight > 0 else None)
        self.projector = Projector(sum(level_dims(self.encoder)), o.global_dim) if o.global_weight > 0 else None
        self.descriptor_head = (DescriptorHead(level_dims(self.encoder), o.descriptor_skip_levels,
                                               rhythm_weight=o.descriptor_rhythm_weight,
                                               rhythm_skip=o.descriptor_rhythm_skip_levels)
                                if o.descriptor_weight > 0 else None)
        self.time_head = (TimeDescriptorHead(cfg.model.time_stage_dim, o.time_stage_rhythm_weight)
                          if cfg.model.time_stage_dim > 0 else None)
        self.teacher = None
        if self.predictor is not None:  # self-distillation target: an EMA of the encoder, never trained
            self.teacher = copy.deepcopy(self.encoder).requires_grad_(False).eval()

    @property
    def needs_views(self) -> bool:
        """Whether batches must carry the second shifted view (`x2`, `shift1`, `shift2`)."""
        return self.objective.lejepa_weight > 0 or self.objective.global_weight > 0

    def train(self, mode: bool = True) -> Pretrainer:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # no stochastic depth in the target
        return self

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student (BYOL / I-JEPA)."""
        if self.teacher is None:
            return
        for t, s in zip(self.teacher.parameters(), self.encoder.parameters(), strict=True):
            t.lerp_(s.detach(), 1.0 - momentum)
        clear_attention_caches(self.teacher)

    def fixed_mask_reconstruction(self, x: Tensor, generator: torch.Generator) -> MaskedReconstruction | None:
        """The reconstruction of x (B, C, H, W) under a mask of the encoder's own kind drawn from
        `generator` (so validation can fix it); None without an MAE decoder or a masking ratio."""
        if self.mae_decoder is None or self.objective.mask_ratio == 0:
            return None
        non_empty = patch_non_empty(x, self.patch_size).flatten(1).cpu()  # (B, N)
        visible = self.encoder.draw_mask(non_empty, self.objective.mask_ratio, generator).to(x.device)
        logits = self.mae_decoder(self.encoder(x, mae_mask=visible)).float()
        loss = masked_recon_loss(logits, x, visible, self.patch_size, pos_weight=self.objective.pos_weight)
        return MaskedReconstruction(logits, visible, self.patch_size, loss)

    def _recon(self, student: EncoderOutput, x: Tensor) -> Tensor:
        """The masked-patch reconstruction loss. When it reads the masked patches alone and the
        decoder can decode chosen patches (Swin, linear head), only those are decoded past the
        last attention: the same loss for a few percent of the decoder's tail."""
        o = self.objective
        kw = {}
        if o.recon_nested:  # nested dropout: sample b reads its levels[b] coarsest levels only
            kw["levels"] = torch.randint(1, self.mae_decoder.read_levels + 1, (len(x),), device=x.device)  # (B,)
        if (o.recon_visible_weight == 0 and isinstance(self.mae_decoder, SwinMAEDecoder)
                and self.mae_decoder.head.mode == "linear"):
            hidden = ~student.mae_mask  # (B, N)
            logits = self.mae_decoder.patch_logits(student, hidden, **kw)  # (M, C, ph, pw)
            return patch_recon_loss(logits, patches_at(x, hidden, self.patch_size), o.pos_weight)
        logits = self.mae_decoder(student, **kw)  # (B, C, H, W)
        return masked_recon_loss(logits, x, student.mae_mask, self.patch_size, o.recon_visible_weight, o.pos_weight)

    def _mep(self, student: EncoderOutput, target: EncoderOutput) -> Tensor:
        """Masked embedding prediction: the predictor's output at the positions the encoder or
        the predictor hid, against the teacher's. Only those positions are predicted (about half
        of them, at a mask ratio of 0.4 to 0.5), which `mep_loss` would read from the full output."""
        masks = self.predictor.draw_masks(student.patches)
        # A position counts as masked if the encoder or the predictor hid it.
        hidden = [~(pm & lvl.mae_mask) for pm, lvl in zip(masks, student.patches)]
        at, valid = zip(*(positions(h) for h in hidden))
        preds, _ = self.predictor(student, masks=masks, at=at)  # [(B, K_i, D_i)]
        targets = [t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1])) for t, idx in zip(target.patches.all_emb, at)]
        return mep_loss(preds, targets, [~v for v in valid], normalize_targets=self.objective.mep_normalize_targets)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        o, x = self.objective, batch["x"]
        parts: dict[str, Tensor] = {}
        if o.global_in_batch:  # both views train every objective: (2B, C, H, W), the first views, then the second
            x = torch.cat([x, batch["x2"]])
        if self.coarse_decoder is not None:
            # An autoencoder through the coarse levels on the second half of the batch: masking is
            # what empties the coarse levels (benchmarks/RESULTS.md), so this half sees all of
            # its roll, and the first half feeds the masked objectives below.
            n = len(x) - len(x) // 2
            x_ae = x[n:]
            batch = {k: v[:n] if isinstance(v, Tensor) else v for k, v in batch.items()}
            x = batch["x"]
            ae = self.encoder(x_ae, mask_ratio=0.0)
            parts["coarse_ae"] = masked_recon_loss(self.coarse_decoder(ae), x_ae, ae.mae_mask, self.patch_size,
                                                   1.0, o.pos_weight)
        student = None
        if self.mae_decoder is not None or self.predictor is not None or self.ms_heads is not None:
            student = self.encoder(x, mask_ratio=o.mask_ratio)  # the masked view
        if self.mae_decoder is not None:
            parts["recon"] = self._recon(student, x)
        if self.predictor is not None:
            with torch.no_grad():
                target = self.teacher(x)  # the full view
            parts["mep"] = self._mep(student, target)
        if self.ms_heads is not None:
            parts["multiscale"] = multiscale_recon_loss(self.ms_heads(student), x, o.pos_weight)
        views = []
        plain: list[EncoderOutput] = []

        def encoded() -> EncoderOutput:
            """The encoding the objectives below read: the masked student's when there is one, else
            the first view's, else x encoded unmasked, once however many objectives read it."""
            if student is not None:
                return student
            if views:
                return views[0]
            if not plain:
                plain.append(self.encoder(x))
            return plain[0]

        if o.lejepa_weight > 0:
            views = [self.encoder(x), self.encoder(batch["x2"])]
            parts["lejepa"] = lejepa_shifted(*views, batch["shift1"], batch["shift2"], o.lejepa_lambda,
                                             o.sigreg_projections)
        if self.projector is not None:
            # The masked student view (when one exists) against a second view masked alike: the
            # mask is one more augmentation, and no extra unmasked forward is paid for.
            if o.global_in_batch:
                z1, z2 = self.projector(encoded()).chunk(2)  # (B, global_dim) each: the pairs' two halves
            else:
                first = encoded()
                second = self.encoder(batch["x2"], mask_ratio=o.mask_ratio if student is not None else 0.0)
                z1, z2 = self.projector(first), self.projector(second)
            parts["global"] = (info_nce(z1, z2, o.global_temperature) if o.global_loss == "infonce"
                               else lejepa_global(z1, z2, o.lejepa_lambda, o.sigreg_projections))
        if o.anchor_weight > 0:
            outs = views or [encoded()]
            per_level = [anchor_loss(lvl.emb, lvl.non_empty, lvl.emb.new_zeros(lvl.dim))
                         for out in outs for lvl in out.patches]
            parts["anchor"] = torch.stack(per_level).mean()
        raw = None
        if self.descriptor_head is not None:
            # The student's view, masked when the other objectives mask it (no extra forward):
            # the descriptors are those of the whole crop, so hidden patches must be inferred.
            raw = descriptors(x)  # (B, F), once for both heads
            parts["descriptors"] = self.descriptor_head.loss(encoded(), x, raw)
        if self.time_head is not None:
            parts["time_stage"] = self.time_head.loss(encoded(), x, raw)
        if o.isotropy_weight > 0:
            coarse = encoded().patches[:o.isotropy_levels]
            parts["isotropy"] = isotropy_loss([lvl.emb for lvl in coarse], [lvl.non_empty for lvl in coarse],
                                              o.sigreg_projections)
        weights = {"recon": o.recon_weight, "mep": o.mep_weight, "multiscale": o.multiscale_weight,
                   "lejepa": o.lejepa_weight, "anchor": o.anchor_weight, "global": o.global_weight,
                   "coarse_ae": o.coarse_ae_weight, "descriptors": o.descriptor_weight,
                   "isotropy": o.isotropy_weight,
                   "time_stage": 1.0}  # the time stage's own loss: under stop-gradient, its weight would only scale its step
        loss = sum(weights[k] * v for k, v in parts.items())
        return loss, parts


class DecoderTrainer(nn.Module):
    """A decoder trained to reconstruct the roll from the encoder's pyramid (BCE on every
    pixel). The encoder is frozen and kept in eval mode unless `finetune`."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, finetune: bool = False,
                 pos_weight: float | None = None) -> None:
        super().__init__()
        self.encoder, self.decoder, self.finetune, self.pos_weight = encoder, decoder, finetune, pos_weight
        self.encoder.requires_grad_(finetune)

    def train(self, mode: bool = True) -> DecoderTrainer:
        super().train(mode)
        if not self.finetune:
            self.encoder.eval()
        return self

    def logits(self, x: Tensor) -> Tensor:
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
            enc_out = self.encoder(x)
        return self.decoder(enc_out)  # (B, C, H, W)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x = batch["x"]
        loss = recon_bce(self.logits(x), x, self.pos_weight)
        return loss, {"bce": loss}


class Classifier(nn.Module):
    """The encoder and a head on one of its levels (`level`, 0 = coarsest) or on all of them
    (`level=None`): each level's tokens pooled (the mean over all of them, or over the non-empty
    ones), LayerNorm, then one Linear on the concatenation, as timm's Swin head pools its last
    stage. Every level has its own LayerNorm: their scales differ by orders of magnitude, and a
    shared one would let the widest level set them. `batch_norm` adds a BatchNorm without affine
    in front of the Linear. Trained with label-smoothed cross-entropy on
    `batch['y']`, weighted per class by `class_weight` when given."""

    def __init__(self, encoder: nn.Module, num_classes: int, level: int | None = 0, pool: str = "mean",
                 label_smoothing: float = 0.0, class_weight: Tensor | None = None, batch_norm: bool = False) -> None:
        super().__init__()
        dims = level_dims(encoder)
        if level is not None and not 0 <= level < len(dims):
            raise ValueError(f"level {level} is out of range: the encoder has {len(dims)} levels, 0 (coarsest) to "
                             f"{len(dims) - 1} (finest); or null for all of them")
        self.encoder, self.level, self.pool, self.label_smoothing = encoder, level, pool, label_smoothing
        self.levels = list(range(len(dims))) if level is None else [level]
        # One level: `norm` is its LayerNorm (the state-dict keys of earlier versions); all: one per level.
        norms = [nn.LayerNorm(dims[i]) for i in self.levels]
        self.norm = norms[0] if level is not None else nn.ModuleList(norms)
        width = sum(dims[i] for i in self.levels)
        # batch_norm: the features standardised over the batch (running statistics in eval), as MAE's
        # linear probe reads them. Pooled features vary between crops by ~1/200 of their scale, so a
        # head fitted to them amplifies any common drift of the encoder's output by that much; the
        # batch statistics take such a drift out. eps far below those variances (~3e-5).
        self.bn = nn.BatchNorm1d(width, affine=False, eps=1e-10) if batch_norm else nn.Identity()
        self.head = nn.Linear(width, num_classes)
        init_linears(self.head)
        # (num_classes,) cross-entropy weights, or None; recomputed from the data, never stored
        self.register_buffer("class_weight", class_weight, persistent=False)

    def features(self, x: Tensor) -> Tensor:
        """(B, D): the pooled level(s) after their LayerNorm, what the linear head reads."""
        patches = self.encoder(x).patches
        pooled = [patches[i].pooled(non_empty_only=self.pool == "non-empty") for i in self.levels]
        norms = self.norm if isinstance(self.norm, nn.ModuleList) else [self.norm]
        return torch.cat([n(p) for n, p in zip(norms, pooled)], dim=-1)

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.bn(self.features(x)))  # (B, num_classes)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        loss = F.cross_entropy(self.logits(batch["x"]).float(), batch["y"], weight=self.class_weight,
                               label_smoothing=self.label_smoothing)
        return loss, {"ce": loss}
