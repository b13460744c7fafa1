"""Our Swin V2 stage against timm 1.0.31, through a fixture made by scripts/make_timm_fixture.py; and,
where windows need padding (there we mask the padding and timm does not), against a per-window reference."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from midi_rae.layers import SwinStage

FIXTURE = Path(__file__).parent / "fixtures" / "timm_swinv2_stages.safetensors"


def load_cases() -> dict:
    cases = {}
    with safe_open(str(FIXTURE), framework="pt") as f:
        meta = f.metadata()
        for key in f.keys():
            name, kind = key.split("/", 1)
            case = cases.setdefault(name, {"config": json.loads(meta[name]), "weights": {}})
            if kind.startswith("weights/"):
                case["weights"][kind.removeprefix("weights/")] = f.get_tensor(key)
            else:
                case[kind] = f.get_tensor(key)
    return cases


CASES = load_cases()


def build(config: dict) -> SwinStage:
    w = config["window"]
    return SwinStage(config["dim"], config["out_dim"], tuple(config["grid"]), config["depth"], config["heads"],
                     (w, w), downsample=config["downsample"])


def run_ours(case: dict, fused: bool, dtype: torch.dtype) -> torch.Tensor:
    stage = build(case["config"]).eval()
    stage.load_state_dict(case["weights"], strict=True)  # timm's names load as they are
    stage = stage.to(dtype)
    for blk in stage.blocks:
        blk.attn.fused = fused
    with torch.no_grad():
        return stage(case["input"].to(dtype))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "math"])
def test_matches_timm_fp32(name: str, fused: bool) -> None:
    # Folding the logit scale into q and adding one combined mask reorders fp32 rounding:
    # on these random weights (outputs up to ~10) timm's own fp32 result is ~2e-5 from the
    # float64 one, so the bound is 1e-5 of the output's scale; exactness is checked in float64.
    expected = CASES[name]["output"]
    out = run_ours(CASES[name], fused, torch.float32)
    assert (out - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "math"])
def test_matches_timm_float64(name: str, fused: bool) -> None:
    out = run_ours(CASES[name], fused, torch.float64)
    torch.testing.assert_close(out, CASES[name]["output64"], atol=1e-12, rtol=0)


def test_fixture_covers_the_required_cases() -> None:
    grids = {tuple(c["config"]["grid"]) for c in CASES.values()}
    assert {(32, 32), (8, 8), (1, 1), (8, 16)} <= grids
    shifted = build(CASES["grid32_win8_shift"]["config"])
    assert shifted.blocks[1].shift_size == (4, 4)
    clamped = build(CASES["grid8_win8_clamped"]["config"])
    assert [b.shift_size for b in clamped.blocks] == [(0, 0), (0, 0)] and clamped.blocks[1].window_size == (8, 8)
    nonsquare = build(CASES["grid8x16_win8_nonsquare"]["config"])
    assert nonsquare.blocks[1].shift_size == (0, 4)  # rows fit one window: shifted along time only


def reference_stage(stage: SwinStage, x: torch.Tensor) -> torch.Tensor:
    """A float64 Swin V2 stage (no downsample) from its definition: each block attends, per
    window of the cyclically shifted grid, among the real tokens of that window that came from
    the same region (shifted windows never join wrapped-around tokens); padding never exists."""
    B, H, W, C = x.shape
    for blk in stage.blocks:
        attn, (wh, ww), (sh, sw) = blk.attn, blk.window_size, blk.shift_size
        nH, hd = attn.num_heads, C // attn.num_heads
        bias = attn.position_bias()  # (nH, wh*ww, wh*ww) over in-window positions
        scale = torch.clamp(attn.logit_scale, max=math.log(100.0)).exp()  # (nH, 1, 1)
        qkv_bias = torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias))
        rolled = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        out = torch.zeros_like(rolled)
        region = lambda i, n, s: int(s > 0 and i >= n - s)  # noqa: E731  1: wrapped around by the shift
        for r0 in range(0, H, wh):
            for c0 in range(0, W, ww):
                cells = [(r, c) for r in range(r0, min(r0 + wh, H)) for c in range(c0, min(c0 + ww, W))]
                groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
                for r, c in cells:
                    groups.setdefault((region(r, H, sh), region(c, W, sw)), []).append((r, c))
                for toks in groups.values():
                    rows, cols = torch.tensor([t[0] for t in toks]), torch.tensor([t[1] for t in toks])
                    t = rolled[:, rows, cols]  # (B, n, C)
                    q, k, v = (t @ attn.qkv.weight.T + qkv_bias).view(B, len(toks), 3, nH, hd).permute(2, 0, 3, 1, 4)
                    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * scale
                    idx = (rows - r0) * ww + (cols - c0)  # in-window positions of the real tokens
                    logits = logits + bias[:, idx][:, :, idx]
                    y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, len(toks), C)
                    out[:, rows, cols] = y @ attn.proj.weight.T + attn.proj.bias
        a = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
        x = x + blk.norm1(a)
        x = x + blk.norm2(blk.mlp(x))
    return x


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "math"])
def test_padded_windows_match_the_per_window_reference(fused: bool) -> None:
    # A 12 x 20 grid in 8 x 8 windows is padded to 16 x 24. We mask padded keys (timm lets the
    # zero padding attend, so timm differs here): every output equals attention among real tokens.
    torch.manual_seed(0)
    stage = SwinStage(8, 8, (12, 20), depth=2, num_heads=2, window_size=(8, 8)).double().eval()
    with torch.no_grad():
        for p in stage.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # leave no parameter at a special value
    assert stage.blocks[1].shift_size == (4, 4)
    for blk in stage.blocks:
        blk.attn.fused = fused
    x = torch.randn(2, 12, 20, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(stage(x), reference_stage(stage, x), atol=1e-12, rtol=0)
