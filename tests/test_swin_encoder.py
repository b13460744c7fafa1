import copy

import pytest
import torch

from midi_rae.config import ConfigError, load_config
from midi_rae.core import EncoderOutput
from midi_rae.layers import DropPath, SwinBlock, WindowAttention
from midi_rae.models import build_encoder
from midi_rae.swin import SwinEncoder
from midi_rae.vit import ViTEncoder

P2 = dict(patch_h=2, patch_w=2, embed_dim=4, depths=(1, 1, 2, 2, 6, 2, 1), num_heads=(1, 1, 1, 2, 4, 8, 16))
CONFIGS = {
    "default_128x128": (dict(img_height=128, img_width=128), [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (32, 32)]),
    "default_128x256": (dict(img_height=128, img_width=256), [(1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 64)]),
    "p2_7_stages": (dict(img_height=128, img_width=128, **P2), [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (32, 32), (64, 64)]),
}


def piano_roll(B: int, H: int, W: int, seed: int = 0) -> torch.Tensor:
    """Sparse notes in the middle pitch band; the outer pitches stay empty."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(B, 1, H, W)
    x[:, :, 40:90] = (torch.rand(B, 1, 50, W, generator=g) > 0.9).float()
    return x


def randomize_post_norms(enc: SwinEncoder) -> None:
    """Zero-initialised post-norms make every block the identity at init (and cut its gradient)."""
    with torch.no_grad():
        for stage in enc.stages:
            for blk in stage.blocks:
                for norm in (blk.norm1, blk.norm2):
                    norm.weight.normal_(1.0, 0.1)
                    norm.bias.normal_(0.0, 0.1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_backward_shapes(name: str) -> None:
    kwargs, grids = CONFIGS[name]
    enc = SwinEncoder(**kwargs)
    x = piano_roll(2, kwargs["img_height"], kwargs["img_width"])
    out = enc(x, mask_ratio=0.5)
    assert isinstance(out, EncoderOutput) and out.patches.num_levels == len(grids)
    dims = [kwargs.get("embed_dim", 8) * 2 ** i for i in range(len(grids))][::-1]
    for lvl, info, grid, dim in zip(out.patches, enc.feature_info, grids, dims):
        N = grid[0] * grid[1]
        assert lvl.emb.shape == (2, N, dim) and torch.isfinite(lvl.emb).all()
        assert lvl.non_empty.shape == lvl.mae_mask.shape == (2, N) and lvl.mae_mask.dtype == torch.bool
        assert info.grid_size == grid and info.dim == dim
        assert lvl.pos.tolist() == [[r, c] for r in range(grid[0]) for c in range(grid[1])]
    assert out.latent is out.patches[0].emb and out.patch_state is out.patches.coarsest
    assert out.full_pos.shape == (grids[-1][0] * grids[-1][1], 2)
    assert out.patches.info == enc.feature_info
    sum(lvl.emb.square().mean() for lvl in out.patches).backward()


def test_level_metadata() -> None:
    enc = SwinEncoder(128, 256)
    assert [i.downsample for i in enc.feature_info] == [(128, 128), (64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]
    assert [i.window_size for i in enc.feature_info] == [(1, 2), (2, 4), (4, 8), (8, 8), (8, 8), (8, 8)]
    # shift only where the grid is larger than one window, per axis
    assert enc.stages[2].blocks[1].shift_size == (0, 4)  # 8 x 16 grid
    assert enc.stages[1].blocks[1].shift_size == (4, 4)  # 16 x 32 grid


def test_spec_test_cell() -> None:
    """The test cell of spec/swin_encoder_plan.md."""
    B, C, H, W = 1, 1, 128, 256
    enc = SwinEncoder(img_height=H, img_width=W, patch_h=4, patch_w=4, in_chans=C, embed_dim=96,
                      depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=8)
    out = enc(torch.randn(B, C, H, W))
    assert out.latent.shape == (1, 32, 768) and out.patch_state.emb.shape == (1, 32, 768)
    assert [tuple(ps.emb.shape) for ps in out.hierarchical.levels] == [(1, 32, 768), (1, 128, 384), (1, 512, 192), (1, 2048, 96)]
    assert [tuple(ps.pos.shape) for ps in out.hierarchical.levels] == [(32, 2), (128, 2), (512, 2), (2048, 2)]


def test_every_parameter_gets_gradient() -> None:
    torch.manual_seed(0)
    # no branch dropped by chance; empty patches never masked, so squashing is not blocked by a mask
    enc = SwinEncoder(128, 128, squash_coarse=True, drop_path_rate=0.0, empty_mask_ratio=0.0)
    randomize_post_norms(enc)
    x = piano_roll(3, 128, 128)
    x[2] = 0  # an all-empty sample, so even the 1x1 level's empty token is used
    out = enc(x, mask_ratio=0.5)
    g = torch.Generator().manual_seed(1)
    loss = sum((lvl.emb * torch.randn(lvl.emb.shape, generator=g)).sum() for lvl in out.patches)
    loss.backward()
    assert all(p.grad is not None for p in enc.parameters())
    # Attention over a single-token window (the 1 x 1 grid) is softmax([s]) = 1 whatever s is, so
    # only what shapes the logits (q, k, temperature, position bias) gets an exactly zero gradient.
    logit_only = ("attn.logit_scale", "attn.q_bias", "attn.cpb_mlp")
    zero = [n for n, p in enc.named_parameters() if p.grad.abs().sum() == 0]
    assert zero and all(n.removeprefix("stages.5.blocks.0.").startswith(logit_only) for n in zero), zero


def test_post_norms_zero_initialised_and_stochastic_depth_linear() -> None:
    enc = SwinEncoder(128, 128, drop_path_rate=0.1)
    blocks = [b for s in enc.stages for b in s.blocks]
    assert all(not (b.norm1.weight.any() or b.norm1.bias.any() or b.norm2.weight.any()) for b in blocks)
    rates = [b.drop_path1.drop_prob if isinstance(b.drop_path1, DropPath) else 0.0 for b in blocks]
    expected = torch.linspace(0, 0.1, len(blocks)).tolist()
    assert rates == pytest.approx(expected)


def test_non_empty_cascade_matches_pixels() -> None:
    enc = SwinEncoder(128, 256)
    x = piano_roll(2, 128, 256)
    out = enc(x)
    for lvl, info in zip(out.patches, enc.feature_info):
        direct = torch.nn.functional.max_pool2d(x, info.downsample)[:, 0] > 0.2  # (B, h, w)
        assert torch.equal(lvl.non_empty, direct.flatten(1))
    assert not enc(torch.zeros(1, 1, 128, 256)).patches.finest.non_empty.any()


def test_simmim_masking_per_sample_and_given_mask() -> None:
    enc = SwinEncoder(128, 128).eval()
    x = piano_roll(3, 128, 128)
    out = enc(x, mask_ratio=0.6)
    vis, ne = out.mae_mask, out.full_non_empty
    expected = torch.round(ne.sum(1) * 0.6) + torch.round((~ne).sum(1) * 0.6 * 0.05)
    assert torch.equal((~vis).sum(1).float(), expected)
    assert not torch.equal(vis[0], vis[1])
    again = enc(x, mae_mask=vis)  # two views can share one mask
    assert torch.equal(again.mae_mask, vis)
    torch.testing.assert_close(again.latent, out.latent)
    # a coarse token is visible only when every patch under it is
    fine = vis.view(3, 32, 32)
    level4 = out.patches[4].mae_mask.view(3, 16, 16)
    assert torch.equal(level4, fine.view(3, 16, 2, 16, 2).all(dim=4).all(dim=2))
    assert torch.equal(enc(x).mae_mask, torch.ones_like(vis))  # no mask unless asked


@pytest.mark.parametrize("squash_coarse", [False, True])
def test_masked_pixels_do_not_reach_the_encoder(squash_coarse: bool) -> None:
    # With squash_coarse, empty tokens must follow what the encoder sees, not the unmasked input.
    enc = SwinEncoder(128, 128, squash_coarse=squash_coarse).eval()
    randomize_post_norms(enc)
    x = piano_roll(2, 128, 128)
    vis = enc(x, mask_ratio=0.5).mae_mask
    x2 = x.clone()
    hidden = (~vis).view(2, 32, 32).repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None]
    x2[hidden] = torch.rand(int(hidden.sum())) * 0.1 + 0.9  # new notes, only under masked patches
    with torch.no_grad():
        a, b = enc(x, mae_mask=vis), enc(x2, mae_mask=vis)
    for la, lb in zip(a.patches, b.patches):
        torch.testing.assert_close(la.emb, lb.emb)


def test_sdpa_and_math_paths_agree() -> None:
    enc = SwinEncoder(128, 128)
    randomize_post_norms(enc)
    x = piano_roll(2, 128, 128)
    outs = []
    for fused in (True, False):
        for m in enc.modules():
            if hasattr(m, "fused"):
                m.fused = fused
        torch.manual_seed(0)  # same drop-path draws
        outs.append(enc(x).latent)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)


def test_version_1_blocks() -> None:
    enc = SwinEncoder(128, 128, version=1)
    out = enc(piano_roll(2, 128, 128), mask_ratio=0.3)
    assert out.latent.shape == (2, 1, 256) and torch.isfinite(out.latent).all()
    assert "stages.0.blocks.0.attn.relative_position_bias_table" in enc.state_dict()


@pytest.mark.parametrize("kwargs,message", [
    (dict(img_height=100, img_width=128), "img_height=100 must be divisible by patch_h"),
    (dict(img_height=128, img_width=96), "img_width=96 must be divisible"),
    (dict(img_height=128, img_width=128, num_heads=(1, 1, 2, 4, 8)), "one entry per stage"),
    (dict(img_height=128, img_width=128, num_heads=(3, 1, 2, 4, 8, 16)), "not divisible by num_heads"),
    (dict(img_height=128, img_width=128, version=3), "version must be"),
])
def test_impossible_configs(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SwinEncoder(**kwargs)


def test_bad_inputs() -> None:
    enc = SwinEncoder(128, 128)
    with pytest.raises(ValueError, match="in_chans=1"):
        enc(torch.zeros(1, 2, 128, 128))
    with pytest.raises(ValueError, match="built for 128x128"):
        enc(torch.zeros(1, 1, 128, 256))
    with pytest.raises(ValueError, match="unsqueeze"):
        enc(torch.zeros(1, 128, 128))
    with pytest.raises(ValueError, match="mae_mask must be"):
        enc(torch.zeros(1, 1, 128, 128), mae_mask=torch.ones(1, 10, dtype=torch.bool))
    # A cache's uint8 roll, a bool mask or a numpy array: one error that says what to pass.
    for x, problem in ((torch.zeros(1, 1, 128, 128, dtype=torch.uint8), "got dtype torch.uint8; pass x.float()"),
                       (torch.zeros(1, 1, 128, 128, dtype=torch.bool), "got dtype torch.bool"),
                       (torch.zeros(1, 1, 128, 128).numpy(), "expects a torch.Tensor piano roll, got ndarray")):
        with pytest.raises(ValueError, match=problem):
            enc(x)


def test_same_calling_code_for_both_encoders() -> None:
    """Built from one keyword dict, driven by one function: the drop-in contract."""
    shared = dict(img_height=128, img_width=256, in_chans=1, embed_dim=32, num_heads=2, mlp_ratio=2.0, mae_ratio=0.5)
    swin = SwinEncoder(**{**shared, "num_heads": (2,) * 6, "embed_dim": 8, "depths": (1,) * 6})
    vit = ViTEncoder(**{**shared, "depth": 2})

    def run(encoder) -> list[tuple[int, ...]]:
        x = piano_roll(2, 128, 256)
        out = encoder(x, mask_ratio=encoder.mae_ratio)
        loss = sum(lvl.emb.square().mean() for lvl in out.patches)
        loss.backward()
        assert out.patches.coarsest is out.patch_state and out.mae_mask.shape == out.full_non_empty.shape
        assert (~out.mae_mask).any() and out.to("cpu").latent.shape == out.latent.shape
        return [tuple(lvl.emb.shape) for lvl in out.patches]

    assert run(swin)[0] == (2, 2, 256)
    assert run(vit) == [(2, 1, 32), (2, 128, 32)]


def test_inter_stage_masking_in_masked_training_forwards_only() -> None:
    torch.manual_seed(0)
    enc = SwinEncoder(128, 128, inter_stage_mask_ratio=0.5, drop_path_rate=0.0)
    randomize_post_norms(enc)
    x = piano_roll(2, 128, 128)
    enc.eval()
    with torch.no_grad():
        a, b = enc(x), enc(x)
    torch.testing.assert_close(a.latent, b.latent)  # eval: deterministic, nothing masked
    enc.train()
    torch.testing.assert_close(enc(x).latent, a.latent)  # an unmasked training forward is left alone
    out = enc(x, mae_mask=torch.ones(2, 32 * 32, dtype=torch.bool))  # the masked pretraining forward
    assert not torch.allclose(out.latent, a.latent)  # stages saw masked inputs
    torch.testing.assert_close(out.patches.finest.emb, a.patches.finest.emb)  # stage 0 input is never masked
    sum((lvl.emb * torch.randn_like(lvl.emb)).sum() for lvl in out.patches).backward()
    assert enc.stage_mask_tokens[0].grad.abs().sum() > 0  # a quarter of stage 1's inputs were its token
    with pytest.raises(ValueError, match="inter_stage_mask_ratio must be"):
        SwinEncoder(128, 128, inter_stage_mask_ratio=1.0)


def _block_calls(enc: SwinEncoder) -> list[int]:
    """A counter of block forward calls (a recomputation in the backward pass counts too)."""
    calls = [0]
    for stage in enc.stages:
        for blk in stage.blocks:
            blk.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_grad_checkpointing_same_outputs_and_gradients() -> None:
    """Every block recomputed in the backward pass gives the same outputs and gradients, drop
    paths included (checkpoint replays the RNG), and recomputes nothing in eval or under no_grad."""
    torch.manual_seed(0)
    plain = SwinEncoder(128, 64, embed_dim=8, depths=(2, 2, 1), num_heads=(1, 2, 4), drop_path_rate=0.3)
    randomize_post_norms(plain)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing()
    calls = _block_calls(ckpt)
    x = piano_roll(2, 128, 64)
    grads = []
    for enc in (plain, ckpt):
        torch.manual_seed(1)
        out = enc(x, mask_ratio=0.5)
        sum(lvl.emb.square().mean() for lvl in out.patches).backward()
        grads.append(({n: p.grad for n, p in enc.named_parameters()}, [lvl.emb.detach() for lvl in out.patches]))
    (g_plain, out_plain), (g_ckpt, out_ckpt) = grads
    assert calls[0] == 2 * 5  # 5 blocks, each run again in the backward pass
    for a, b in zip(out_plain, out_ckpt):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert g_plain.keys() == g_ckpt.keys()
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-5, atol=1e-7, msg=name)
    assert all(g.abs().sum() > 0 for g in g_ckpt.values())
    calls[0] = 0
    with torch.no_grad():
        ckpt(x)
    ckpt.eval()
    out = ckpt(x)
    assert calls[0] == 2 * 5 and out.latent.requires_grad  # once per block, with or without a graph


def test_grad_checkpointing_from_config() -> None:
    enc = build_encoder(load_config("quickstart", ["model.grad_checkpointing=true"]))
    assert all(stage.grad_checkpointing for stage in enc.stages)
    assert not any(stage.grad_checkpointing for stage in build_encoder(load_config("quickstart")).stages)
    with pytest.raises(ConfigError, match="model.grad_checkpointing applies to the Swin encoder only; set it to false"):
        load_config("vit_baseline", ["model.grad_checkpointing=true"])



def melody_roll(B: int, H: int, W: int) -> torch.Tensor:
    """(B, 1, H, W) one voice in a fifth of the pitch range: most windows hold no note."""
    x = torch.zeros(B, 1, H, W)
    for b in range(B):
        for t in range(0, W, 4):
            x[b, 0, 60 + (t * 7 + 3 * b) % 14, t:t + 3] = 1
    return x


def forward_backward(enc: SwinEncoder, x: torch.Tensor, sparse: bool) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    for m in enc.modules():
        if isinstance(m, SwinBlock):
            m.sparse, m.sparse_min_share = sparse, 0.0  # sparse: every block takes the path, however few are constant
            m.attn.clear_cache()  # in eval mode the position bias is cached detached after its first use
    enc.zero_grad()
    out = enc(x)
    sum((lvl.emb * torch.linspace(-1, 1, lvl.emb.shape[-1])).square().mean() for lvl in out.patches).backward()
    return [lvl.emb.detach() for lvl in out.patches], {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("version", [2, 1])
@pytest.mark.parametrize("train", [True, False])
def test_constant_windows_path_equals_dense(version: int, train: bool, monkeypatch) -> None:
    """Windows of equal tokens computed once (`SwinBlock._sparse_forward`) give the dense path's
    outputs and gradients: shifted windows, a padded grid (12 columns, windows of 8) and both
    block versions included; and the fast path really ran."""
    torch.manual_seed(0)
    enc = SwinEncoder(128, 96, embed_dim=8, depths=(2, 2), num_heads=(1, 2), drop_path_rate=0.0, version=version)
    if version == 2:
        randomize_post_norms(enc)
    enc.train(train)
    x = melody_roll(3, 128, 96)
    calls = []
    constant = WindowAttention.constant
    monkeypatch.setattr(WindowAttention, "constant", lambda self, t: calls.append(len(t)) or constant(self, t))
    dense_out, dense_grad = forward_backward(enc, x, sparse=False)
    assert not calls
    sparse_out, sparse_grad = forward_backward(enc, x, sparse=True)
    assert len(calls) == 4 and calls[0] > 0 and calls[1] > 0  # stage 0's blocks had constant windows
    for a, b in zip(dense_out, sparse_out):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert dense_grad.keys() == sparse_grad.keys()
    scale = max(float(g.abs().max()) for g in dense_grad.values())
    for name, g in dense_grad.items():
        torch.testing.assert_close(sparse_grad[name], g, rtol=0, atol=1e-5 * scale, msg=name)


def test_constant_windows_path_is_chosen_by_occupancy(monkeypatch) -> None:
    """Automatic: sparse on the CPU where enough windows are constant; dense on a busy roll, and
    under drop path in training (it draws per sample)."""
    calls = []
    constant = WindowAttention.constant
    monkeypatch.setattr(WindowAttention, "constant", lambda self, t: calls.append(len(t)) or constant(self, t))
    enc = SwinEncoder(128, 64, embed_dim=8, depths=(1, 1), num_heads=(1, 2), drop_path_rate=0.0).eval()
    enc((torch.rand(2, 1, 128, 64, generator=torch.Generator().manual_seed(0)) > 0.5).float())  # no window constant
    assert not calls
    enc(melody_roll(2, 128, 64))
    assert calls
    ran = []
    sparse_forward = SwinBlock._sparse_forward
    monkeypatch.setattr(SwinBlock, "_sparse_forward", lambda self, x: ran.append(self) or sparse_forward(self, x))
    enc = SwinEncoder(128, 64, embed_dim=8, depths=(2, 2), num_heads=(1, 2), drop_path_rate=0.1).train()
    enc(melody_roll(2, 128, 64))
    assert ran == [enc.stages[0].blocks[0]]  # the only block whose drop-path rate is 0


def test_windows_equal_in_one_channel_are_not_constant(monkeypatch) -> None:
    """The first-channel pre-check only rules windows out: windows whose tokens agree in channel 0
    but not beyond run as full windows, and the block's output is the dense path's."""
    calls = []
    constant = WindowAttention.constant
    monkeypatch.setattr(WindowAttention, "constant", lambda self, t: calls.append(len(t)) or constant(self, t))
    torch.manual_seed(0)
    block = SwinBlock(8, (16, 16), num_heads=2, window_size=(8, 8)).eval()  # 4 windows per sample
    x = torch.zeros(2, 16, 16, 8)
    x[..., 1:] = 0.5
    x[:, :8, :8, 1:] = torch.randn(2, 8, 8, 7)  # the top-left window: varies beyond channel 0 only
    block.sparse = False
    dense = block(x)
    block.sparse = True
    out = block(x)
    assert calls == [6]  # the other 3 windows of each sample
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_fold_onsets_reads_both_channels_through_one() -> None:
    """fold_onsets = a one-channel encoder fed (frame + onset) / 2: the same weights give the same
    levels, and a repeated note (two onsets) no longer looks like one held note."""
    kw = dict(img_height=128, img_width=64, embed_dim=8, depths=(1, 1, 1), num_heads=(1, 2, 4), drop_path_rate=0.0)
    torch.manual_seed(0)
    folded = SwinEncoder(in_chans=2, fold_onsets=True, **kw).eval()
    plain = SwinEncoder(in_chans=1, **kw).eval()
    plain.load_state_dict(folded.state_dict())
    held = torch.zeros(1, 2, 128, 64)
    held[0, 0, 60, 8:16] = 1  # one note of 8 steps
    held[0, 1, 60, 8] = 1
    repeated = held.clone()
    repeated[0, 1, 60, 12] = 1  # the same pitch struck again at step 12: the frame channel is unchanged
    x = torch.cat([held, repeated])
    out = folded(x)
    ref = plain(x.mean(1, keepdim=True))
    for a, b in zip(out.patches.levels, ref.patches.levels):
        torch.testing.assert_close(a.emb, b.emb)
    assert not torch.allclose(out.patches.finest.emb[0], out.patches.finest.emb[1])
    with pytest.raises(ValueError, match="input has 1 channels"):
        folded(held[:, :1])


def test_lagged_autocorrelation_is_the_descriptors_onset_autocorrelation() -> None:
    """The autocorrelation stage's product, given the onset-column indicator of a hand-made roll
    (an onset every 3 steps in one voice, every 8 in another), is the descriptors' onset
    autocorrelation at every lag, lags past the crop included (0)."""
    from midi_rae.descriptors import NAMES, descriptors
    from midi_rae.swin import lagged_autocorrelation

    W = 40
    x = torch.zeros(1, 2, 128, W)  # frame + onset
    for pitch, period in ((60, 3), (48, 8)):
        x[0, :, pitch, ::period] = 1
    lags = [NAMES.index(f"onset_autocorr_{k}") for k in range(1, 33)]
    onset_cols = (x[0, 1].sum(0) > 0).float()  # (W,)
    got = lagged_autocorrelation(onset_cols[None, :, None], 48)[0, 0]  # (48,)
    torch.testing.assert_close(got[:32], descriptors(x)[0, lags].float())
    assert got[W - 1:].eq(0).all() and got[2] > 3 * max(got[1], got[3])  # lag 3 stands out


def test_autocorr_time_stage_is_one_token_under_stop_gradient() -> None:
    """time_stage_kind=autocorr: one token a crop, sounding where the crop has a note; its output
    sends no gradient into the pyramid; a crop narrower than its lags runs."""
    kw = dict(img_height=128, img_width=64, embed_dim=8, depths=(1, 1, 1), num_heads=(1, 2, 4), drop_path_rate=0.0)
    torch.manual_seed(0)
    enc = SwinEncoder(time_stage_dim=16, time_stage_kind="autocorr", time_stage_signals=4, time_stage_lags=32, **kw)
    x = piano_roll(3, 128, 64)
    x[2] = 0  # a silent crop
    out = enc(x)
    assert out.time.emb.shape == (3, 1, 16) and out.time.pos.tolist() == [[0, 0]]
    assert out.time.non_empty.tolist() == [[True], [True], [False]]
    out.time.emb.square().sum().backward()
    assert all(p.grad is None for n, p in enc.named_parameters() if not n.startswith("time_stage."))
    assert all(p.grad is not None for n, p in enc.named_parameters() if n.startswith("time_stage."))
    narrow = SwinEncoder(time_stage_dim=16, time_stage_kind="autocorr", time_stage_signals=4, time_stage_lags=32,
                         **{**kw, "img_width": 32})  # 8 finest columns, 32 lags
    narrow.load_state_dict(enc.state_dict())
    assert narrow(piano_roll(1, 128, 32)).time.emb.shape == (1, 1, 16)
    with pytest.raises(ValueError, match="time_stage_kind must be one of \\('transformer', 'autocorr'\\) \\(got 'fft'\\)"):
        SwinEncoder(time_stage_dim=16, time_stage_kind="fft", **kw)
    with pytest.raises(ConfigError, match="model.time_stage_kind must be 'transformer' or 'autocorr' \\(got 'fft'\\)"):
        load_config(None, ["model.time_stage_dim=16", "model.time_stage_kind=fft"])
    load_config(None, ["model.time_stage_dim=6", "model.time_stage_kind=autocorr"])  # no heads to divide its width


def test_time_stage_reads_the_pyramid_under_stop_gradient() -> None:
    """time_stage_dim: one token per finest column beside the pyramid, sounding where the column
    has a note; the pyramid is the same as without the stage (same weights), and the stage's
    output sends no gradient into it; a crop of another width runs (sinusoidal positions)."""
    kw = dict(img_height=128, img_width=64, embed_dim=8, depths=(1, 1, 1), num_heads=(1, 2, 4), drop_path_rate=0.0)
    torch.manual_seed(0)
    enc = SwinEncoder(time_stage_dim=16, time_stage_depth=1, time_stage_heads=2, **kw)
    plain = SwinEncoder(**kw)
    missing, unexpected = plain.load_state_dict(enc.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("time_stage.") for k in unexpected)
    randomize_post_norms(enc), plain.load_state_dict(enc.state_dict(), strict=False)
    x = piano_roll(2, 128, 64)
    x[1, :, :, 40:] = 0  # the second crop falls silent after step 40
    out = enc(x)
    assert plain(x).time is None
    for a, b in zip(out.patches, plain(x).patches):
        torch.testing.assert_close(a.emb, b.emb)
    for lvl, info in zip(out.patches, enc.feature_info):  # the grid the stage is given is the one pos spells
        torch.testing.assert_close(lvl.column_means(info.grid_size), lvl.column_means())
    cols = 64 // 4
    assert out.time.emb.shape == (2, cols, 16) and out.time.pos.tolist() == [[0, c] for c in range(cols)]
    assert out.time.non_empty[0].all() and out.time.non_empty[1].tolist() == [c < 10 for c in range(cols)]
    out.time.emb.square().sum().backward()
    trunk = {n: p.grad for n, p in enc.named_parameters() if not n.startswith("time_stage.")}
    assert all(g is None for g in trunk.values())
    assert all(p.grad is not None for n, p in enc.named_parameters() if n.startswith("time_stage."))
    assert enc.layer_ids()["time_stage.proj.1.weight"] == max(enc.layer_ids().values())

    wide = SwinEncoder(time_stage_dim=16, time_stage_depth=1, time_stage_heads=2, **{**kw, "img_width": 128})
    wide.load_state_dict(enc.state_dict())
    assert wide(piano_roll(1, 128, 128)).time.emb.shape == (1, 32, 16)
    with pytest.raises(ValueError, match="time_stage_dim \\(10\\) must be 0 \\(no time stage\\) or a positive multiple of "
                                         "time_stage_heads \\(4\\)"):
        SwinEncoder(time_stage_dim=10, **kw)
    with pytest.raises(ConfigError, match="model.time_stage_dim reads the Swin pyramid's levels over time: it needs "
                                          "model.encoder=swin, got vit"):
        load_config(None, ["model.encoder=vit", "model.num_heads=2", "model.time_stage_dim=16"])
    with pytest.raises(ConfigError, match="model.time_stage_dim must be 0 \\(none\\) or a positive multiple of "
                                          "model.time_stage_heads \\(4\\)"):
        load_config(None, ["model.time_stage_dim=6"])
