import pytest
import torch

from midi_rae.core import EncoderOutput, HierarchicalPatchState, LevelInfo, PatchState, grid_positions
from midi_rae.utils import param_count


def make_state(B: int = 2, rows: int = 2, cols: int = 3, D: int = 4) -> PatchState:
    N = rows * cols
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, -1] = False
    return PatchState(torch.randn(B, N, D), grid_positions(rows, cols), torch.ones(B, N, dtype=torch.bool), mask)


def test_grid_positions_row_major() -> None:
    pos = grid_positions(2, 3)
    assert pos.dtype == torch.long
    assert pos.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_patch_state_properties_and_selections() -> None:
    ps = make_state()
    assert (ps.dim, ps.num_patches, ps.batch_size) == (4, 6, 2)
    assert ps.visible.shape == (11, 4) and ps.masked.shape == (1, 4)
    torch.testing.assert_close(ps.masked[0], ps.emb[0, -1])


def test_patch_state_rejects_mismatched_shapes() -> None:
    ps = make_state()
    with pytest.raises(ValueError, match="pos must be"):
        PatchState(ps.emb, ps.pos[:-1], ps.non_empty, ps.mae_mask)
    with pytest.raises(ValueError, match="mae_mask must be"):
        PatchState(ps.emb, ps.pos, ps.non_empty, ps.mae_mask[:, :-1])


def test_to_casts_embeddings_only() -> None:
    ps = make_state().to(torch.float64)
    assert ps.emb.dtype == torch.float64
    assert ps.pos.dtype == torch.long and ps.mae_mask.dtype == torch.bool


def test_hierarchy_and_encoder_output_aliases() -> None:
    coarse, fine = make_state(rows=1, cols=1, D=8), make_state(rows=2, cols=2, D=4)
    info = [LevelInfo((1, 1), 8, (1, 1), (8, 8)), LevelInfo((2, 2), 4, (2, 2), (4, 4))]
    hps = HierarchicalPatchState([coarse, fine], info)
    assert len(hps) == hps.num_levels == 2
    assert hps[0] is coarse and hps.coarsest is coarse and hps.finest is fine
    assert [e.shape[-1] for e in hps.all_emb] == [8, 4]
    out = EncoderOutput(hps, fine.pos, fine.non_empty, fine.mae_mask)
    assert out.hierarchical is hps and out.patch_state is coarse and out.latent is coarse.emb
    moved = out.to("cpu", dtype=torch.float64)
    assert moved.latent.dtype == torch.float64 and moved.mae_mask.dtype == torch.bool
    assert moved.patches.info == info
    with pytest.raises(ValueError, match="info has"):
        HierarchicalPatchState([coarse, fine], info[:1])


def test_param_count() -> None:
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    m[1].weight.requires_grad_(False)
    assert param_count(m) == (16 + 2, 16 + 2 + 8)
