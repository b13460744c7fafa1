"""Every mask is made here and consumed through the helpers at the bottom.

Convention: bool `(B, N)`, True = visible, False = masked. Masks are drawn per sample.
Empty patches (no note) are trivial to reconstruct, so they are masked less often: at
`mask_ratio * empty_mask_ratio` instead of `mask_ratio`.
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def note_mask(x: Tensor) -> Tensor:
    """Where a roll holds a note: any value above 0. Rolls are 0 / 1, or velocity / 127 from a
    `prepare --velocity` cache, where a soft note (velocity 20 = 0.16) is still a note."""
    return x > 0


def patch_non_empty(x: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """(B, C, H, W) -> (B, H/ph, W/pw) bool, True where the patch holds a note."""
    return note_mask(F.max_pool2d(x.amax(dim=1, keepdim=True), patch_size).squeeze(1))


def _check(non_empty: Tensor, mask_ratio: float, empty_mask_ratio: float) -> None:
    if non_empty.dim() != 2 or non_empty.dtype != torch.bool:
        raise ValueError(f"non_empty must be a (B, N) bool tensor, got {tuple(non_empty.shape)} {non_empty.dtype}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if not 0.0 <= empty_mask_ratio <= 1.0:
        raise ValueError(f"empty_mask_ratio must be in [0, 1], got {empty_mask_ratio}")


def pool_mask(mask: Tensor, any_of: bool) -> Tensor:
    """Halve a (B, H, W) bool grid with 2x2 windows: any child True (any_of) or all children True."""
    B, H, W = mask.shape
    # bool reductions over 2 x 2 cells (an odd last row or column dropped, as pooling does): no
    # float copy and no pooling kernel
    cells = mask[:, : H // 2 * 2, : W // 2 * 2].reshape(B, H // 2, 2, W // 2, 2)
    return cells.any(4).any(2) if any_of else cells.all(4).all(2)


def simmim_mask(non_empty: Tensor, mask_ratio: float, empty_mask_ratio: float = 0.05,
                generator: torch.Generator | None = None) -> Tensor:
    """SimMIM-style mask (https://arxiv.org/abs/2111.09886): the grid stays whole, masked
    patches are replaced by a token. Per sample, exactly round(mask_ratio * n_non_empty)
    non-empty and round(mask_ratio * empty_mask_ratio * n_empty) empty patches are masked,
    chosen uniformly. non_empty: (B, N) bool -> (B, N) bool, True = visible."""
    _check(non_empty, mask_ratio, empty_mask_ratio)
    noise = torch.rand(non_empty.shape, device=non_empty.device, generator=generator)
    groups = ((non_empty, mask_ratio), (~non_empty, mask_ratio * empty_mask_ratio))
    return _mask_in_groups(noise, [(group, torch.round(group.sum(1) * ratio).long()) for group, ratio in groups])


def _mask_in_groups(noise: Tensor, groups: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Per sample b, mask n[b] members of each (group (B, N) bool, n (B,) long), chosen uniformly
    by the (B, N) uniform `noise`. Returns (B, N) bool, True = visible."""
    visible = torch.ones_like(groups[0][0])
    for group, n_mask in groups:
        score = noise.masked_fill(~group, 2.0)  # members of other groups sort last
        order = score.argsort(dim=1)
        # (B, N) rank of each patch within the sample: the inverse permutation of `order`, by a
        # scatter where a second argsort would sort again
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        visible &= ~(group & (rank < n_mask[:, None]))
    return visible


def mae_mask(non_empty: Tensor, mask_ratio: float, empty_mask_ratio: float = 0.05,
             generator: torch.Generator | None = None) -> Tensor:
    """MAE-style mask (https://arxiv.org/abs/2111.06377): the same number of patches,
    round(mask_ratio * N), is masked in every sample so visible tokens stack into (B, N_vis, D).
    Patches are drawn without replacement with weight 1 (non-empty) or empty_mask_ratio (empty),
    by the exponential-key trick (Efraimidis & Spirakis 2006): key = log(u) / weight, mask the
    largest keys. non_empty: (B, N) bool -> (B, N) bool, True = visible."""
    _check(non_empty, mask_ratio, empty_mask_ratio)
    B, N = non_empty.shape
    n_mask = round(mask_ratio * N)
    u = torch.rand(non_empty.shape, device=non_empty.device, generator=generator).clamp_min(1e-12)
    weight = torch.where(non_empty, 1.0, max(empty_mask_ratio, 1e-6))
    masked_idx = (u.log() / weight).topk(n_mask, dim=1).indices  # (B, n_mask)
    visible = torch.ones_like(non_empty)
    return visible.scatter(1, masked_idx, False)


def patch_pixels(mask: Tensor, grid: tuple[int, int], patch_size: tuple[int, int]) -> Tensor:
    """A (B, N) patch mask over a row-major `grid` -> (B, 1, H, W), each patch's value on its pixels."""
    B = mask.shape[0]
    (gh, gw), (ph, pw) = grid, patch_size
    return mask.view(B, 1, gh, 1, gw, 1).expand(B, 1, gh, ph, gw, pw).reshape(B, 1, gh * ph, gw * pw)


def check_mask(mask: Tensor, batch: int, n: int, device: torch.device) -> Tensor:
    """Validate a user-given mask: (B, N), bool or 0/1, returned as bool on `device`."""
    if mask.shape != (batch, n):
        raise ValueError(f"mae_mask must be (B, N) = ({batch}, {n}) for this input, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mae_mask must be bool or hold only 0 and 1 (1 = visible, 0 = masked)")
    return mask.to(device=device, dtype=torch.bool)


def apply_mask_token(x: Tensor, visible: Tensor, token: Tensor) -> Tensor:
    """Replace masked tokens by a learned one. x: (B, N, D) or (B, H, W, D); visible: x.shape[:-1]."""
    return torch.where(visible[..., None], x, token.to(x.dtype))


def gather_visible(x: Tensor, visible: Tensor) -> Tensor:
    """(B, N, D) -> (B, N_vis, D); every sample must have the same number of visible tokens."""
    counts = visible.sum(1)
    if (counts != counts[0]).any():
        raise ValueError("every sample needs the same number of visible tokens to drop the masked ones; "
                         "draw the mask with masking.mae_mask")
    idx = visible.float().argsort(dim=1, descending=True, stable=True)[:, : int(counts[0])]  # (B, N_vis), in order
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def scatter_visible(x_vis: Tensor, visible: Tensor, fill: Tensor | float = 0.0) -> Tensor:
    """Inverse of gather_visible: (B, N_vis, D) -> (B, N, D) with `fill` at masked positions."""
    B, N = visible.shape
    out = torch.empty(B, N, x_vis.shape[-1], device=x_vis.device, dtype=x_vis.dtype)
    out[:] = fill if isinstance(fill, (int, float)) else fill.to(x_vis.dtype)
    out[visible] = x_vis.reshape(-1, x_vis.shape[-1])
    return out


def level_mask(non_empty: Tensor, mask_ratio: float, empty_mask_ratio: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
    """SimMIM-style mask for one level of a pyramid, where grids can be as small as 1 x 1.

    As `simmim_mask`, but each group's count is rounded stochastically, floor(r * n) +
    Bernoulli(frac(r * n)), so the expected masked fraction is exactly r on any grid: a 1 x 1
    level is masked with probability r per sample, where round(r) would mask it never (r < 0.5)
    or always. non_empty: (B, N) bool -> (B, N) bool, True = visible."""
    _check(non_empty, mask_ratio, empty_mask_ratio)
    noise = torch.rand(non_empty.shape, device=non_empty.device, generator=generator)
    coin = torch.rand((2, non_empty.shape[0]), device=non_empty.device, generator=generator)
    counts = []
    for g, (group, ratio) in enumerate(((non_empty, mask_ratio), (~non_empty, mask_ratio * empty_mask_ratio))):
        expected = group.sum(1) * ratio  # (B,)
        counts.append((group, (expected.floor() + (coin[g] < expected.frac()).float()).long()))  # mean = expected
    return _mask_in_groups(noise, counts)
