"""Benchmark SwinEncoder against a timm Swin V2 stack of the same shape, in one process.

timm is not a dependency of midi-rae; run this in a separate virtual environment:

    python3 -m venv .venv-timm && .venv-timm/bin/pip install timm==1.0.31
    PYTHONPATH=. .venv-timm/bin/python benchmarks/bench_encoder.py --out results.md

(or `.venv-timm/bin/pip install -e .` instead of PYTHONPATH). The reference is timm's
PatchEmbed + SwinTransformerV2Stage x len(depths) + LayerNorm, built with our shapes, with our
(randomised) weights copied in: every stage's state_dict loads with strict=True. Before timing,
every stage output is checked against ours in fp32 eval mode.

What each side runs: ours is `SwinEncoder.forward(x)` (input checks, patch embed, empty-patch
token, mask token with nothing masked, stages, final norm, pooled masks, EncoderOutput);
timm's is patch embed, the same empty-patch token, stages, final norm, per-stage features.
The input is a random binary roll, so almost no patch is empty. drop_path_rate is 0 for both.
fwd+bwd is train mode, loss = sum of all stage outputs. Compile time (first call, which also
compiles the backward) is reported apart and excluded from the timings; inductor's on-disk
cache makes it shorter on a second run. CUDA runs use bf16 autocast.
"""
import argparse
import ctypes
import gc
import math
import statistics
import time
from contextlib import nullcontext

import torch
from timm.layers import PatchEmbed
from timm.models.swin_transformer_v2 import SwinTransformerV2Stage
from torch import nn

from midi_rae.masking import apply_mask_token, patch_non_empty
from midi_rae.swin import SwinEncoder

PRESETS = {
    "default": dict(patch_h=4, patch_w=4, embed_dim=8, depths=(1, 2, 2, 6, 2, 1), num_heads=(1, 1, 2, 4, 8, 16)),
    "p2": dict(patch_h=2, patch_w=2, embed_dim=4, depths=(1, 1, 2, 2, 6, 2, 1), num_heads=(1, 1, 1, 2, 4, 8, 16)),
}


class TimmSwin(nn.Module):
    """timm's V2 stages with SwinEncoder's shapes: patch embed -> empty token -> stages -> norm."""

    def __init__(self, enc: SwinEncoder, cfg: dict, window_size: int, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        depths, heads, dim = cfg["depths"], cfg["num_heads"], cfg["embed_dim"]
        self.patch_size = enc.patch_size
        self.patch_embed = PatchEmbed(enc.img_size, enc.patch_size, enc.in_chans, dim, nn.LayerNorm, output_fmt="NHWC")
        self.empty_token = nn.Parameter(torch.zeros(dim))
        dims = [dim * 2**i for i in range(len(depths))]
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        grid, self.stages = enc.grid_size, nn.ModuleList()
        for i, (depth, nh) in enumerate(zip(depths, heads)):
            self.stages.append(SwinTransformerV2Stage(dims[max(i - 1, 0)], dims[i], grid, depth, nh, window_size,
                                                      downsample=i > 0, drop_path=dpr[sum(depths[:i]):sum(depths[: i + 1])]))
            grid = self.stages[-1].output_resolution
        self.norm = nn.LayerNorm(dims[-1])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = apply_mask_token(self.patch_embed(x), patch_non_empty(x, self.patch_size), self.empty_token)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        feats[-1] = self.norm(feats[-1])
        return feats  # NHWC, finest first


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Random weights everywhere (our init zeroes the post-norms, which would hide attention).
    Logit scales stay near log(10): timm's -100 shift mask is only hard while logits stay small."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if name.endswith("logit_scale"):
                p.copy_(math.log(10) + 0.3 * r)
            elif p.dim() > 1:
                p.copy_(r / math.sqrt(p[0].numel()))
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * r)


def build(preset: str, window_size: int, img: int = 128) -> tuple[SwinEncoder, TimmSwin]:
    cfg = PRESETS[preset]
    ours = SwinEncoder(img, img, window_size=window_size, drop_path_rate=0.0, **cfg)
    randomize(ours)
    ref = TimmSwin(ours, cfg, window_size)
    # timm (1.0.29 and later) normalises a 1 x 1 window's one relative coordinate by window - 1 = 0:
    # NaN, where ours keeps it 0 (layers.attention). Set theirs to that 0 so the stage can be compared.
    for name, buf in ref.named_buffers():
        if name.endswith("relative_coords_table"):
            buf.nan_to_num_(0.0)
    ref.patch_embed.load_state_dict(ours.patch_embed.state_dict(), strict=True)
    for theirs, mine in zip(ref.stages, ours.stages):
        theirs.load_state_dict(mine.state_dict(), strict=True)
    ref.norm.load_state_dict(ours.norm.state_dict(), strict=True)
    ref.empty_token.data.copy_(ours.empty_token.data)
    return ours, ref


def features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Per-stage outputs, finest first, as (B, N, C)."""
    out = model(x)
    if isinstance(out, list):
        return [f.flatten(1, 2) for f in out]
    return [lvl.emb for lvl in out.patches.levels[::-1]]


def check_parity(ours: nn.Module, ref: nn.Module, img: int, tol: float = 1e-4) -> list[float]:
    x = (torch.rand(4, 1, img, img, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    with torch.no_grad():
        a, b = features(ours.eval(), x), features(ref.eval(), x)
    errs = []
    for i, (fa, fb) in enumerate(zip(a, b)):
        err = ((fa - fb).abs().max() / fb.abs().max()).item()
        print(f"stage {i}: {tuple(fa.shape)} max|ours - timm| / max|timm| = {err:.2e}")
        if not err <= tol:
            raise SystemExit(f"stage {i} differs from timm by {err:.2e} of its scale (> {tol:.0e}); not benchmarking")
        errs.append(err)
    return errs


def rss_kb(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))


def make_step(model: nn.Module, x: torch.Tensor, backward: bool, compiled: bool):
    """One iteration (forward, or forward + backward in train mode), synchronised on CUDA."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if x.device.type == "cuda" else nullcontext()
    model.train(backward)
    fn = torch.compile(model) if compiled else model

    def step() -> None:
        with torch.no_grad() if not backward else nullcontext(), autocast:
            loss = sum(f.float().sum() for f in features(fn, x))
        if backward:
            loss.backward()
            model.zero_grad(set_to_none=True)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
    return step


def timed(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def peak_mb(step, device: str) -> float:
    """Memory one more iteration needs above what is held before it: CUDA peak allocated, or
    on CPU the peak RSS (VmHWM) growth, after handing freed heap back to the OS (Linux only)."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = rss_kb("VmRSS")
    step()
    return (rss_kb("VmHWM") - base) / 1024


def measure(models: dict, x: torch.Tensor, backward: bool, compiled: bool, warmup: int, iters: int) -> dict:
    """Median ms per iteration of each model; their iterations alternate, so that load from
    other processes hits both alike. The first call (compilation) is timed apart."""
    torch.compiler.reset()
    steps = {name: make_step(m.to(x.device), x, backward, compiled) for name, m in models.items()}
    res = {name: dict(compile_s=timed(step), times=[]) for name, step in steps.items()}
    for _ in range(warmup):
        for step in steps.values():
            step()
    for _ in range(iters):
        for name, step in steps.items():
            res[name]["times"].append(timed(step))
    for name, step in steps.items():
        res[name].update(ms=1e3 * statistics.median(res[name]["times"]), mb=peak_mb(step, x.device.type))
    return res


def profile(ours: nn.Module, ref: nn.Module, img: int, batch: int, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    x = (torch.rand(batch, 1, img, img) > 0.5).float()
    text = []
    for name, model in (("ours", ours), ("timm", ref)):
        model.train()
        for _ in range(2):
            sum(f.sum() for f in features(model, x)).backward()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                sum(f.sum() for f in features(model, x)).backward()
                model.zero_grad(set_to_none=True)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40)
        text.append(f"### {name}: fwd+bwd, batch {batch}, CPU eager, 3 iterations, top {rows} ops by self CPU time\n\n"
                    f"```\n{table}\n```\n")
    return "\n".join(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), default="default")
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--img", type=int, default=128, help="square input side (pitches x time steps)")
    p.add_argument("--batch", type=int, nargs="+", default=[8, 64])
    p.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="cuda is skipped when unavailable")
    p.add_argument("--modes", nargs="+", choices=["eager", "compile"], default=["eager", "compile"])
    p.add_argument("--passes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    p.add_argument("--warmup", type=int, default=None, help="default: 2 on CPU, 10 on CUDA")
    p.add_argument("--iters", type=int, default=None, help="timed iterations, default: 5 on CPU, 50 on CUDA")
    p.add_argument("--profile", action="store_true", help="also profile fwd+bwd at the first batch size, CPU eager")
    p.add_argument("--out", help="append the Markdown results to this file")
    args = p.parse_args()

    torch.manual_seed(0)
    ours, ref = build(args.preset, args.window, args.img)
    errs = check_parity(ours, ref, args.img)
    lines = [f"preset `{args.preset}`, {args.img}x{args.img}, window {args.window}; parity (max abs diff / output "
             f"scale, fp32 eval, every stage): worst {max(errs):.1e}", "",
             "| device | mode | pass | batch | ours ms | timm ms | timm/ours | ours peak MB | timm peak MB | compile s ours / timm |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    print("\n".join(lines))
    for device in args.devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("cuda: not available, skipped")
            continue
        warmup = args.warmup if args.warmup is not None else (10 if device == "cuda" else 2)
        iters = args.iters if args.iters is not None else (50 if device == "cuda" else 5)
        mode_name = "bf16 " if device == "cuda" else ""
        for mode in args.modes:
            for pass_ in args.passes:
                for batch in args.batch:
                    x = (torch.rand(batch, 1, args.img, args.img, device=device) > 0.5).float()
                    r = measure(dict(ours=ours, timm=ref), x, pass_ == "fwd+bwd", mode == "compile", warmup, iters)
                    comp = (f"{r['ours']['compile_s']:.1f} / {r['timm']['compile_s']:.1f}" if mode == "compile" else "-")
                    line = (f"| {device} | {mode_name}{mode} | {pass_} | {batch} | {r['ours']['ms']:.1f} | "
                            f"{r['timm']['ms']:.1f} | {r['timm']['ms'] / r['ours']['ms']:.2f} | {r['ours']['mb']:.0f} | "
                            f"{r['timm']['mb']:.0f} | {comp} |")
                    print(line, flush=True)
                    lines.append(line)
        ours.cpu(), ref.cpu()
    if args.profile:
        prof = profile(ours, ref, args.img, args.batch[0], rows=20)
        print(prof)
        lines += ["", prof]
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
