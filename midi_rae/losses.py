"""Training signals as pure functions of predictions, targets and masks.

Masks follow the package convention: bool, True = visible, False = masked. Nothing here
detaches a target: whether gradients flow into the target branch (e.g. an EMA teacher or
a stop-gradient view) is the caller's choice.
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .masking import note_mask, patch_pixels


def safe_mean(x: Tensor) -> Tensor:
    """Mean of `x`, or 0 (not NaN) when `x` is empty, e.g. a selection of masked positions
    in a batch where nothing was masked. Keeps the graph, so gradients stay defined."""
    if x.numel() == 0:
        return x.sum()  # 0.0, connected to x's graph
    return x.mean()


def _pos_weight(pos_weight: float | Tensor | None, like: Tensor) -> Tensor | None:
    """A float or a per-channel (C,) tensor, shaped to broadcast over (B, C, H, W)."""
    if pos_weight is None:
        return None
    w = torch.as_tensor(pos_weight, dtype=like.dtype, device=like.device)
    return w.view(-1, 1, 1) if w.dim() == 1 else w


def recon_bce(logits: Tensor, target: Tensor, pos_weight: float | Tensor | None = None) -> Tensor:
    """Mean BCE-with-logits over every pixel of logits (B, C, H, W) against where the target
    roll's notes sound (`note_mask`). pos_weight: float or (C,), as in `masked_recon_loss`."""
    return F.binary_cross_entropy_with_logits(logits, note_mask(target).to(logits.dtype),
                                              pos_weight=_pos_weight(pos_weight, logits))


def masked_recon_loss(logits: Tensor, target: Tensor, visible: Tensor, patch_size: int | tuple[int, int],
                      visible_weight: float = 0.0, pos_weight: float | Tensor | None = None) -> Tensor:
    """BCE-with-logits reconstruction, SimMIM style (https://arxiv.org/abs/2111.09886): the mean
    over pixels of masked patches, plus `visible_weight` x the mean over pixels of visible ones.

    logits, target: (B, C, H, W); visible: (B, N) bool over the (H/ph, W/pw) patch grid in
    row-major order, True = visible. pos_weight: float or (C,), weight of the note (positive)
    class, for sparse rolls. With nothing masked the masked term is 0, not NaN. The target is
    where notes sound (`note_mask`), so a velocity roll is learned as notes, not as velocities.
    """
    B, C, H, W = logits.shape
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    gh, gw = H // ph, W // pw
    if H % ph or W % pw or visible.shape != (B, gh * gw):
        raise ValueError(f"visible must be (B, N) = ({B}, {gh * gw}) for {H}x{W} logits and {ph}x{pw} patches, "
                         f"got {tuple(visible.shape)}")
    vis_px = patch_pixels(visible, (gh, gw), (ph, pw)).expand(B, C, H, W)
    bce = F.binary_cross_entropy_with_logits(logits, note_mask(target).to(logits.dtype), pos_weight=_pos_weight(pos_weight, logits),
                                             reduction="none")  # (B, C, H, W)
    loss = safe_mean(bce[~vis_px])
    if visible_weight:
        loss = loss + visible_weight * safe_mean(bce[vis_px])
    return loss


def patches_at(x: Tensor, select: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """The patches of x (B, C, H, W) where select (B, N) bool is True, over the row-major
    (H/ph, W/pw) grid, sample by sample: (M, C, ph, pw)."""
    B, C, H, W = x.shape
    ph, pw = patch_size
    patches = x.view(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, ph, pw)
    return patches.reshape(-1, C, ph, pw)[select.reshape(-1)]


def patch_recon_loss(logits: Tensor, target: Tensor, pos_weight: float | Tensor | None = None) -> Tensor:
    """`masked_recon_loss` of patches already selected: mean BCE-with-logits over every pixel of
    logits (M, C, ph, pw) against where target (M, C, ph, pw) holds notes; 0 when M = 0. With the
    masked patches (`patches_at(x, ~visible)`) it equals `masked_recon_loss` at visible_weight 0."""
    bce = F.binary_cross_entropy_with_logits(logits, note_mask(target).to(logits.dtype),
                                             pos_weight=_pos_weight(pos_weight, logits), reduction="none")
    return safe_mean(bce)


def mep_loss(preds: Sequence[Tensor], targets: Sequence[Tensor], masks: Sequence[Tensor],
             level_weights: Sequence[float] | None = None, normalize_targets: bool = False) -> Tensor:
    """Masked embedding prediction: per level, the MSE over masked positions only; then the
    weighted mean over levels (a level with nothing masked adds 0 but keeps its weight).

    preds[i], targets[i]: (B, N_i, D_i); masks[i]: (B, N_i) bool, True = visible (ignored).
    `normalize_targets` layer-normalises each target token without affine parameters, as MAE
    (https://arxiv.org/abs/2111.06377) and I-JEPA do. Targets are not detached here: pass
    `t.detach()` (or a teacher's output) when they must not receive gradients.
    """
    weights = [1.0] * len(preds) if level_weights is None else list(level_weights)
    if not len(preds) == len(targets) == len(masks) == len(weights):
        raise ValueError(f"got {len(preds)} preds, {len(targets)} targets, {len(masks)} masks and "
                         f"{len(weights)} level weights; pass one per level")
    total = 0.0
    for p, t, m, w in zip(preds, targets, masks, weights):
        if normalize_targets:
            t = F.layer_norm(t, t.shape[-1:])
        err = (p - t).square().mean(-1)  # (B, N_i)
        total = total + w * safe_mean(err[~m])
    return total / sum(weights)


# Outside torch.compile's graph (a small draw): a width seen at two sizes (two levels) turns symbolic
# there, and randn of a symbolic size fails to trace.
@torch.compiler.disable
def random_directions(dim: int, num: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> Tensor:
    """(dim, num) unit-norm random directions, uniform on the sphere."""
    gen_device = generator.device if generator is not None else device
    a = torch.randn(dim, num, generator=generator, device=gen_device).to(device)
    return a / a.norm(dim=0, keepdim=True)


def epps_pulley(x: Tensor, t_max: float = 5.0, num_points: int = 17) -> Tensor:
    """Epps-Pulley statistic of each column of x (N, M) against N(0, 1): (M,).

    EP = N * integral |phi_N(t) - exp(-t^2/2)|^2 w(t) dt,  w(t) = exp(-t^2/2),
    phi_N(t) = 1/N sum_n exp(i t x_n) = mean cos(t x) + i mean sin(t x)   (LeJEPA eq. for SIGReg,
    https://arxiv.org/abs/2511.08544). The imaginary (sin) part is what sees a mean shift or
    skew: the real part alone is the same for x and -x. The integrand is even in t, so we
    integrate over [0, t_max] with the trapezoid rule and double it (the paper uses [-5, 5]).
    """
    N = x.shape[0]
    t = torch.linspace(0.0, t_max, num_points, device=x.device, dtype=x.dtype)  # (T,)
    xt = x[..., None] * t  # (N, M, T)
    re, im = xt.cos().mean(0), xt.sin().mean(0)  # (M, T) each
    gauss = torch.exp(-0.5 * t**2)  # CF of N(0, 1), also the weight
    err = ((re - gauss).square() + im.square()) * gauss  # (M, T)
    return 2.0 * N * torch.trapezoid(err, t, dim=-1)  # (M,)


def sigreg(z: Tensor, num_projections: int = 256, generator: torch.Generator | None = None,
           t_max: float = 5.0, num_points: int = 17) -> Tensor:
    """SIGReg (LeJEPA, https://arxiv.org/abs/2511.08544): push embeddings z (N, D) toward an
    isotropic standard normal by testing random 1-D projections with Epps-Pulley, averaged
    over `num_projections` unit directions (fresh each call, or from `generator`).

    Scaled by N as in the paper, so under the target distribution it is O(1) for any N, and a
    deviation costs more the more samples show it. Finite for any N >= 1. Computed in float32.
    """
    a = random_directions(z.shape[-1], num_projections, generator, z.device)
    return _sliced_epps_pulley(z, a, t_max, num_points)


def _sliced_epps_pulley(z: Tensor, a: Tensor, t_max: float = 5.0, num_points: int = 17) -> Tensor:
    """Mean Epps-Pulley statistic of z (..., D) flattened to (N, D), along the columns of a (D, M).
    In float32 even under autocast: cos(t x) for t up to 5 needs more than bf16's 3 digits."""
    with torch.autocast(z.device.type, enabled=False):
        return epps_pulley(z.flatten(0, -2).float() @ a.float(), t_max, num_points).mean()


def isotropy_loss(levels: Sequence[Tensor], valid: Sequence[Tensor], num_projections: int = 256,
                  generator: torch.Generator | None = None) -> Tensor:
    """SIGReg on the shape of each level's token distribution, averaged over levels: the tokens
    levels[i] (B, N_i, D_i) where valid[i] (B, N_i) is True, centred and divided by their RMS (one
    scale for the level, so no direction is rescaled on its own), tested against an isotropic
    standard normal. Scale and mean are left free (a decoder or a probe normalises them); what it
    penalises is variance held by a few directions (a collapsed level). A level with fewer than
    two valid tokens adds 0."""
    total = levels[0].new_zeros(())
    for z, keep in zip(levels, valid):
        z = z[keep].float()  # (M, D)
        if len(z) < 2:
            continue
        z = z - z.mean(0)
        total = total + sigreg(z / z.square().mean().sqrt().clamp_min(1e-6), num_projections, generator)
    return total / len(levels)


def lejepa_loss(levels_view1: Sequence[Tensor], levels_view2: Sequence[Tensor], lam: float = 0.05,
                valid: Sequence[Tensor] | None = None, num_projections: int = 256,
                generator: torch.Generator | None = None, aligned: Sequence[Tensor] | None = None) -> Tensor:
    """LeJEPA per level (https://arxiv.org/abs/2511.08544), averaged over levels:
    (1 - lam) * invariance + lam * SIGReg.

    levels_view*[i]: (B, N_i, D_i), the same level of two views as the encoder gave them.
    Invariance: the MSE between view 1 and `aligned[i]` (view 2 re-indexed onto view 1's grid;
    default view 2 itself, for views whose positions correspond) over the positions where
    `valid[i]` (B, N_i) is True (default all). SIGReg: every token of both views, flattened to
    (2 * B * N_i, D_i), so re-indexing duplicates never count twice; the 1 x 1 level (B samples
    a view) is included like any other.
    """
    if len(levels_view1) != len(levels_view2):
        raise ValueError(f"views have {len(levels_view1)} and {len(levels_view2)} levels; pass the same levels")
    targets = levels_view2 if aligned is None else aligned
    total = 0.0
    for i, (z1, z2, t2) in enumerate(zip(levels_view1, levels_view2, targets)):
        err = (z1 - t2).square().mean(-1)  # (B, N_i)
        inv = safe_mean(err if valid is None else err[valid[i]])
        sig = sigreg(torch.cat([z1, z2]).flatten(0, 1), num_projections, generator)
        total = total + (1 - lam) * inv + lam * sig
    return total / len(levels_view1)


def anchor_loss(emb: Tensor, non_empty: Tensor, anchor: Tensor) -> Tensor:
    """Mean squared distance of empty-patch embeddings to a fixed anchor (e.g. the encoder's
    empty token, or zeros): emb (B, N, D), non_empty (B, N) bool, anchor (D,). 0 when no
    patch is empty. Detach the anchor if it must not move toward the embeddings."""
    return safe_mean((emb - anchor).square().mean(-1)[~non_empty])


def pool_roll(target: Tensor, size: tuple[int, int]) -> Tensor:
    """Max-pool a roll (B, C, H, W) to (B, C, h, w): a cell is on if any pixel under it is."""
    H, W = target.shape[-2:]
    h, w = size
    if H % h or W % w:
        raise ValueError(f"a {H}x{W} roll cannot be pooled to {h}x{w}: sizes must divide")
    return F.max_pool2d(target, (H // h, W // w))


def multiscale_recon_loss(level_logits: Sequence[Tensor], target: Tensor,
                          pos_weight: float | Tensor | None = None) -> Tensor:
    """BCE of each level's logits (B, C, h_i, w_i) against the target roll (B, C, H, W)
    max-pooled to (h_i, w_i), averaged over levels, where notes sound (`note_mask`). See
    `predictor.MultiScaleReconHeads`."""
    target = note_mask(target).to(level_logits[0].dtype)
    losses = [F.binary_cross_entropy_with_logits(lg, pool_roll(target, lg.shape[-2:]),
                                                 pos_weight=_pos_weight(pos_weight, lg))
              for lg in level_logits]
    return torch.stack(losses).mean()


def info_nce(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """Symmetric InfoNCE / NT-Xent (SimCLR, https://arxiv.org/abs/2002.05709) between two views:
    z1[i] and z2[i] (B, D) are a positive pair, every other row of either view a negative."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)  # (2B, D)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))  # a view is not its own positive
    B = z1.shape[0]
    target = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)]).to(z.device)
    return F.cross_entropy(logits, target)


def lejepa_global(z1: Tensor, z2: Tensor, lam: float = 0.05, num_projections: int = 256) -> Tensor:
    """LeJEPA on one embedding per view (https://arxiv.org/abs/2511.08544): (1 - lam) * the
    squared distance between the two views' z (B, D) + lam * SIGReg on both views' z."""
    inv = (z1 - z2).square().mean()
    return (1 - lam) * inv + lam * sigreg(torch.cat([z1, z2]), num_projections)
