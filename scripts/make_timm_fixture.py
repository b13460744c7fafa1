"""Make the fixture that checks our Swin V2 stage against timm's, without timm in the tests.

timm is not a dependency of midi-rae (it pulls in torchvision). Run this once, in a separate
virtual environment:

    python3 -m venv .venv-timm && .venv-timm/bin/pip install timm==1.0.31 safetensors
    .venv-timm/bin/python scripts/make_timm_fixture.py

For each case it builds a timm `SwinTransformerV2Stage` with random (not default) weights,
runs it in fp32 eval mode on a random input, and stores the weights (timm's state_dict
names), the input and timm's outputs, in fp32 and (same weights cast) in float64, in
tests/fixtures/timm_swinv2_stages.safetensors, with each case's configuration in the file's
metadata. tests/test_timm_parity.py loads the weights into our `SwinStage` with strict=True
and compares outputs: fp32 to 1e-5 of the output scale, float64 to 1e-12.
"""
import json
import math
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from timm.models.swin_transformer_v2 import SwinTransformerV2Stage

TIMM_VERSION = "1.0.31"
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "timm_swinv2_stages.safetensors"

# name: grid (rows, cols) at the stage input, channels in/out, depth, heads, window, downsample
CASES = {
    "grid32_win8_shift": dict(grid=(32, 32), dim=16, out_dim=16, depth=2, heads=2, window=8, downsample=False),
    "grid8_win8_clamped": dict(grid=(8, 8), dim=16, out_dim=16, depth=2, heads=2, window=8, downsample=False),
    "grid1_win8": dict(grid=(1, 1), dim=32, out_dim=32, depth=2, heads=4, window=8, downsample=False),
    "grid8x16_win8_nonsquare": dict(grid=(8, 16), dim=16, out_dim=16, depth=2, heads=2, window=8, downsample=False),
    "grid16x32_merge_win4": dict(grid=(16, 32), dim=8, out_dim=16, depth=2, heads=2, window=4, downsample=True),
}


def randomize(stage: torch.nn.Module, gen: torch.Generator) -> None:
    """Random weights everywhere, so that every parameter matters (timm's init zeroes the
    post-norms and biases). Logit scales stay near log(10): timm masks shifted windows with
    -100 rather than -inf, which is only a hard mask while logits stay well below 100."""
    with torch.no_grad():
        for name, p in stage.named_parameters():
            if name.endswith("logit_scale"):
                p.copy_(math.log(10) + 0.3 * torch.randn(p.shape, generator=gen))
            elif p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))


def main() -> None:
    if timm.__version__ != TIMM_VERSION:
        raise SystemExit(f"the fixture is defined against timm {TIMM_VERSION}, found {timm.__version__}")
    gen = torch.Generator().manual_seed(0)
    tensors, meta = {}, {"timm": timm.__version__, "torch": torch.__version__}
    for name, c in CASES.items():
        stage = SwinTransformerV2Stage(c["dim"], c["out_dim"], c["grid"], c["depth"], c["heads"], c["window"],
                                       downsample=c["downsample"]).eval()
        randomize(stage, gen)
        x = torch.randn(2, *c["grid"], c["dim"], generator=gen)
        with torch.no_grad():
            y = stage(x)
            y64 = stage.double()(x.double())  # the same weights in float64: rounding-free reference
        assert torch.isfinite(y).all(), name
        tensors.update({f"{name}/weights/{k}": v.float().contiguous() for k, v in stage.state_dict().items()})
        tensors[f"{name}/input"] = x
        tensors[f"{name}/output"] = y.contiguous()
        tensors[f"{name}/output64"] = y64.contiguous()
        meta[name] = json.dumps(c)
        print(f"{name}: in {tuple(x.shape)} -> out {tuple(y.shape)}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata=meta)
    print(f"wrote {OUT.name}: {OUT.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
