import math

import pytest
import torch
import torch.nn.functional as F

from midi_rae.losses import (anchor_loss, epps_pulley, isotropy_loss, lejepa_loss, masked_recon_loss, mep_loss, multiscale_recon_loss,
                             pool_roll, random_directions, recon_bce, safe_mean, sigreg)


def bce(logit: float, target: float, pos_weight: float = 1.0) -> float:
    s = 1 / (1 + math.exp(-logit))
    return -(pos_weight * target * math.log(s) + (1 - target) * math.log(1 - s))


# ---- masked reconstruction ------------------------------------------------------------

def test_masked_recon_matches_hand_computation() -> None:
    """A 2 x 4 roll in 2 x 2 patches: grid 1 x 2, the right patch masked."""
    logits = torch.tensor([[[[0.0, 1.0, 2.0, -1.0], [0.5, -0.5, 3.0, -2.0]]]])
    target = torch.tensor([[[[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]]]])
    visible = torch.tensor([[True, False]])
    L, T = logits[0, 0].tolist(), target[0, 0].tolist()
    left = [(r, c) for r in range(2) for c in range(2)]
    right = [(r, c) for r in range(2) for c in range(2, 4)]
    for pw in (1.0, 2.0):
        masked = sum(bce(L[r][c], T[r][c], pw) for r, c in right) / 4
        vis = sum(bce(L[r][c], T[r][c], pw) for r, c in left) / 4
        got = masked_recon_loss(logits, target, visible, 2, visible_weight=0.3, pos_weight=pw)
        assert got.item() == pytest.approx(masked + 0.3 * vis, rel=1e-6)
    assert masked_recon_loss(logits, target, visible, (2, 2)).item() == pytest.approx(
        sum(bce(L[r][c], T[r][c]) for r, c in right) / 4, rel=1e-6)


def test_masked_recon_patch_layout_non_square() -> None:
    """Patch n = row * cols + col of a 2 x 3 grid of 2 x 4 patches covers its own pixels only."""
    torch.manual_seed(0)
    logits, target = torch.randn(1, 2, 4, 12), torch.rand(1, 2, 4, 12).round()
    visible = torch.ones(1, 6, dtype=torch.bool)
    visible[0, 4] = False  # row 1, col 1
    expected = F.binary_cross_entropy_with_logits(logits[..., 2:4, 4:8], target[..., 2:4, 4:8])
    assert torch.allclose(masked_recon_loss(logits, target, visible, (2, 4)), expected)
    with pytest.raises(ValueError, match="visible must be"):
        masked_recon_loss(logits, target, torch.ones(1, 4, dtype=torch.bool), (2, 4))


def test_masked_recon_all_visible_is_zero_not_nan() -> None:
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    loss = masked_recon_loss(logits, torch.rand(2, 1, 8, 8), torch.ones(2, 4, dtype=torch.bool), 4)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()
    with_visible = masked_recon_loss(logits, torch.zeros(2, 1, 8, 8), torch.ones(2, 4, dtype=torch.bool), 4,
                                     visible_weight=1.0)
    assert with_visible > 0


def test_per_channel_pos_weight() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(2, 2, 4, 4), torch.rand(2, 2, 4, 4).round()
    visible = torch.zeros(2, 4, dtype=torch.bool)
    expected = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor([2.0, 5.0]).view(2, 1, 1))
    assert torch.allclose(masked_recon_loss(logits, target, visible, 2, pos_weight=torch.tensor([2.0, 5.0])), expected)


# ---- masked embedding prediction --------------------------------------------------------

def levels(B: int = 2, seed: int = 0) -> tuple[list, list, list]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, 16), (4, 8), (8, 4)]
    preds = [torch.randn(B, n, d, generator=g) for n, d in shapes]
    targets = [torch.randn(B, n, d, generator=g) * 3 + 1 for n, d in shapes]
    masks = [torch.rand(B, n, generator=g) > 0.5 for n, _ in shapes]
    masks[0][0, 0], masks[0][1, 0] = False, True
    return preds, targets, masks


def test_mep_loss_hand_computation_and_masked_only() -> None:
    preds, targets, masks = levels()
    manual = sum(safe_mean((p[~m] - t[~m]) ** 2) for p, t, m in zip(preds, targets, masks)) / 3
    assert torch.allclose(mep_loss(preds, targets, masks), manual)
    moved = [torch.where(m[..., None], p + 10.0, p) for p, m in zip(preds, masks)]  # change visible positions only
    assert torch.allclose(mep_loss(moved, targets, masks), manual)
    moved = [torch.where(m[..., None], p, p + 10.0) for p, m in zip(preds, masks)]
    assert mep_loss(moved, targets, masks) > manual + 1


def test_mep_loss_normalized_targets_and_weights() -> None:
    preds, targets, masks = levels()
    normed = [F.layer_norm(t, t.shape[-1:]) for t in targets]
    assert torch.allclose(mep_loss(preds, targets, masks, normalize_targets=True), mep_loss(preds, normed, masks))
    assert normed[1].mean(-1).abs().max() < 1e-5 and torch.allclose(normed[1].std(-1, unbiased=False), torch.ones(1), atol=1e-3)
    only_first = mep_loss(preds[:1], targets[:1], masks[:1])
    assert torch.allclose(mep_loss(preds, targets, masks, level_weights=[1.0, 0.0, 0.0]), only_first)
    all_visible = [torch.ones_like(m) for m in masks]
    assert mep_loss(preds, targets, all_visible).item() == 0.0


def test_mep_loss_leaves_detaching_to_caller() -> None:
    preds, targets, masks = levels()
    targets = [t.requires_grad_() for t in targets]
    mep_loss(preds, targets, masks).backward()
    assert targets[0].grad is not None


# ---- SIGReg ---------------------------------------------------------------------------

def test_sigreg_gaussian_low_shift_and_collapse_high() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2048, 16, generator=g)
    gauss = sigreg(z, 64, torch.Generator().manual_seed(1)).item()
    shifted = sigreg(z + 5.0, 64, torch.Generator().manual_seed(1)).item()
    collapsed = sigreg(torch.full_like(z, 0.3), 64, torch.Generator().manual_seed(1)).item()
    # Under N(0, I) the N-scaled statistic is O(1): E = int (1 - e^{-t^2}) e^{-t^2/2} dt ~ 1.06.
    assert gauss < 3.0
    assert shifted > 10 * gauss and collapsed > 10 * gauss


def test_sigreg_uses_imaginary_part() -> None:
    """|N(0,1)| has exactly the real characteristic function of N(0,1); only the sin part tells them apart."""
    y = torch.randn(4096, 1, generator=torch.Generator().manual_seed(0))
    half = y.abs()
    t = torch.linspace(0, 5, 17)

    def real_only(x: torch.Tensor) -> float:
        err = ((x * t).cos().mean(0) - torch.exp(-t**2 / 2)).square() * torch.exp(-t**2 / 2)
        return (2 * x.shape[0] * torch.trapezoid(err, t)).item()

    assert real_only(half) < 3.0  # a real-only statistic would not see the skew
    assert sigreg(half, 8).item() > 50 * sigreg(y, 8).item()


def test_epps_pulley_matches_quadrature_of_the_formula() -> None:
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.linspace(-5, 5, 801, dtype=torch.float64)
    ecf = torch.exp(1j * x[..., None] * t).mean(0)  # (3, T) complex
    err = (ecf - torch.exp(-t**2 / 2)).abs().square() * torch.exp(-t**2 / 2)
    reference = 200 * torch.trapezoid(err, t, dim=-1)
    assert torch.allclose(epps_pulley(x, num_points=401), reference, rtol=1e-4)


def test_sigreg_small_batches_finite_and_directions() -> None:
    for n in (1, 2):
        z = torch.randn(n, 8, requires_grad=True)
        loss = sigreg(z)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    a = random_directions(8, 32, torch.Generator().manual_seed(0))
    assert torch.allclose(a.norm(dim=0), torch.ones(32))
    z = torch.randn(64, 8)
    assert sigreg(z, 16, torch.Generator().manual_seed(3)) == sigreg(z, 16, torch.Generator().manual_seed(3))


def test_isotropy_loss_sees_collapse_not_scale_or_mean() -> None:
    """Isotropic tokens score O(1) at any scale and offset; tokens on two directions (plus a
    little noise) score far higher; masked-out tokens are not read."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 512, 16, generator=g)
    keep = torch.ones(2, 512, dtype=torch.bool)

    def iso(t: torch.Tensor, k: torch.Tensor = keep) -> float:
        return isotropy_loss([t], [k], 64, torch.Generator().manual_seed(1)).item()

    gauss = iso(z)
    assert gauss < 3.0
    assert iso(0.01 * z + 7.0) == pytest.approx(gauss, rel=1e-3)  # one scale and a mean shift change nothing
    low_rank = torch.randn(2, 512, 2, generator=g) @ torch.randn(2, 16, generator=g) + 0.05 * z
    assert iso(low_rank) > 10 * gauss
    # The collapsed tokens masked out: only the isotropic ones are read.
    mixed = torch.cat([z, low_rank], 1)
    mask = torch.cat([keep, torch.zeros_like(keep)], 1)
    assert iso(mixed, mask) == pytest.approx(gauss, rel=1e-5)
    # Averaged over levels; a level with fewer than two valid tokens adds 0.
    one = torch.zeros(2, 4, dtype=torch.bool)
    one[0, 0] = True
    two = isotropy_loss([z, torch.randn(2, 4, 8)], [keep, one], 64, torch.Generator().manual_seed(1)).item()
    assert two == pytest.approx(gauss / 2, rel=1e-5)


def test_isotropy_loss_under_torch_compile_over_levels_of_two_widths() -> None:
    """`train.compile=true` with `objective.isotropy_weight` (the `reference` preset): the loss over
    levels of two widths traces (the tracer turns the width symbolic, and the random directions
    are drawn outside its graph, from the global generator as training draws them) and gives the
    eager values."""
    compiled = torch.compile(isotropy_loss, backend="eager")  # dynamo's tracing is what failed; no inductor needed
    g = torch.Generator().manual_seed(0)
    # Its second level recompiles the SIGReg frame with the width symbolic.
    levels = [torch.randn(2, 8, 32, generator=g), torch.randn(2, 4, 16, generator=g)]
    valid = [torch.rand(2, 8, generator=g) > 0.3, torch.rand(2, 4, generator=g) > 0.3]
    torch.manual_seed(1)
    got = compiled(levels, valid, 64).item()
    torch.manual_seed(1)
    assert got == pytest.approx(isotropy_loss(levels, valid, 64).item(), rel=1e-5)


# ---- LeJEPA ---------------------------------------------------------------------------

def pyramid(B: int = 2, seed: int = 0, requires_grad: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, d, generator=g).requires_grad_(requires_grad) for n, d in ((1, 16), (4, 8), (16, 4))]


def test_lejepa_identical_views_is_lam_sigreg() -> None:
    z = pyramid()
    got = lejepa_loss(z, z, lam=0.2, num_projections=32, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    expected = sum(sigreg(torch.cat([lvl, lvl]).flatten(0, 1), 32, g) for lvl in z) / 3  # both views' tokens
    assert torch.allclose(got, 0.2 * expected)


def test_lejepa_sigreg_reads_the_views_not_their_alignment() -> None:
    """With `aligned` (view 2 re-indexed onto view 1, as for shifted crops) the invariance term
    compares against it, while SIGReg still sees every token of both views exactly once."""
    z1, z2 = pyramid(seed=0), pyramid(seed=1)
    got = lejepa_loss(z1, z2, lam=0.5, num_projections=16, generator=torch.Generator().manual_seed(3), aligned=z1)
    g = torch.Generator().manual_seed(3)
    expected = sum(sigreg(torch.cat([a, b]).flatten(0, 1), 16, g) for a, b in zip(z1, z2)) / 3  # invariance 0
    assert torch.allclose(got, 0.5 * expected)


def test_lejepa_invariance_term_and_valid_mask() -> None:
    z1, z2 = pyramid(seed=0), pyramid(seed=1)
    inv = sum(((a - b) ** 2).mean() for a, b in zip(z1, z2)) / 3
    assert torch.allclose(lejepa_loss(z1, z2, lam=0.0), inv)
    valid = [torch.zeros(2, z.shape[1], dtype=torch.bool) for z in z1]
    valid[1][0, 2] = True
    assert torch.allclose(lejepa_loss(z1, z2, lam=0.0, valid=valid), ((z1[1][0, 2] - z2[1][0, 2]) ** 2).mean() / 3)


@pytest.mark.parametrize("lam", [0.05, 1.0])
def test_lejepa_every_level_contributes(lam: float) -> None:
    z1, z2 = pyramid(seed=0, requires_grad=True), pyramid(seed=1, requires_grad=True)
    loss = lejepa_loss(z1, z2, lam=lam)
    loss.backward()
    assert torch.isfinite(loss)
    for z in (*z1, *z2):  # the 1 x 1 level (B = 2 samples) included
        assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


# ---- anchor and multi-scale -----------------------------------------------------------

def test_anchor_loss() -> None:
    emb = torch.tensor([[[1.0, 2.0], [3.0, 3.0], [0.0, 0.0]]])
    non_empty = torch.tensor([[True, False, False]])
    anchor = torch.tensor([1.0, 1.0])
    # empty: (3,3) -> ((2^2 + 2^2) / 2) = 4; (0,0) -> 1; mean = 2.5
    assert anchor_loss(emb, non_empty, anchor).item() == pytest.approx(2.5)
    assert anchor_loss(emb, torch.ones_like(non_empty), anchor).item() == 0.0


def test_multiscale_pooling_and_loss() -> None:
    torch.manual_seed(0)
    target = (torch.rand(2, 2, 16, 32) > 0.9).float()
    sizes = [(1, 2), (2, 4), (4, 8), (16, 32)]
    for h, w in sizes:
        assert torch.equal(pool_roll(target, (h, w)), F.max_pool2d(target, (16 // h, 32 // w)))
    logits = [torch.randn(2, 2, h, w) for h, w in sizes]
    expected = sum(F.binary_cross_entropy_with_logits(lg, F.max_pool2d(target, (16 // h, 32 // w)))
                   for lg, (h, w) in zip(logits, sizes)) / len(sizes)
    assert torch.allclose(multiscale_recon_loss(logits, target), expected)
    with pytest.raises(ValueError, match="cannot be pooled"):
        pool_roll(target, (3, 4))


def test_velocity_targets_count_as_notes() -> None:
    # A velocity roll (v / 127) is reconstructed as where notes sound, not as its velocities.
    g = torch.Generator().manual_seed(0)
    notes = (torch.rand(2, 1, 16, 32, generator=g) > 0.8).float()
    velocity = notes * 60 / 127
    logits = torch.randn(2, 1, 16, 32, generator=g)
    visible = torch.rand(2, 32, generator=g) > 0.5  # 4 x 8 grid of 4 x 4 patches
    assert torch.equal(masked_recon_loss(logits, velocity, visible, 4), masked_recon_loss(logits, notes, visible, 4))
    assert torch.equal(recon_bce(logits, velocity, 3.0), recon_bce(logits, notes, 3.0))
    heads = [torch.randn(2, 1, 4, 8, generator=g), torch.randn(2, 1, 1, 2, generator=g)]
    assert torch.equal(multiscale_recon_loss(heads, velocity), multiscale_recon_loss(heads, notes))
