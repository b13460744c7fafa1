"""Gradient checkpointing: peak memory and step time of an encoder training step with and without
`model.grad_checkpointing` (every Swin block recomputed in the backward pass).

    PYTHONPATH=. python benchmarks/bench_grad_checkpointing.py                    # swin_b, batch 8, CPU
    PYTHONPATH=. python benchmarks/bench_grad_checkpointing.py --preset swin_t --batch 32 --device cuda

One step is the encoder's forward on a batch of random sparse 128 x W rolls in train mode (drop
path as the preset sets it, nothing masked), a loss summing every level, and the backward pass;
weights and inputs are the same for both variants.

Memory: each variant runs in a fresh subprocess, so that what one variant's heap holds cannot hide
the other's peak. There a first step allocates the gradients (kept, as in training); then the
step's peak above the memory held before it is measured: on CPU the growth of the peak resident
set (VmHWM, reset through /proc/self/clear_refs after handing freed heap back with malloc_trim;
Linux only), on CUDA the growth of max_memory_allocated. That is the activation memory plus the
step's temporaries; the process's own peak resident set (ru_maxrss) is printed too.

Time: both variants in this process, their steps alternating (so that load from other processes
hits both alike), after one warm-up step each; the median over --iters steps.
"""
import argparse
import ctypes
import gc
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from midi_rae.config import load_config
from midi_rae.models import build_encoder
from midi_rae.utils import param_count

VARIANTS = ("plain", "grad_checkpointing")


def build(args: argparse.Namespace, variant: str) -> tuple[nn.Module, torch.Tensor]:
    """The preset's encoder (seeded, so both variants hold the same weights) and a seeded batch."""
    cfg = load_config(args.preset, [f"data.crop_width={args.width}", f"data.channels={args.channels}",
                                    f"model.grad_checkpointing={variant == 'grad_checkpointing'}"])
    torch.manual_seed(0)
    enc = build_encoder(cfg).to(args.device).train()
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(args.batch, args.channels, 128, args.width, generator=g) > 0.95).float()
    return enc, x.to(args.device)


def step(enc: nn.Module, x: torch.Tensor) -> None:
    """Forward, a loss over every level, backward; gradients accumulate in place (kept between steps)."""
    out = enc(x)
    sum(lvl.emb.square().mean() for lvl in out.patches).backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize()


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def step_peak_mb(enc: nn.Module, x: torch.Tensor) -> float:
    """Memory one step needs above what is held before it (see the module docstring)."""
    if x.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(enc, x)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = rss_kb("VmRSS")
    step(enc, x)
    return (rss_kb("VmHWM") - base) / 1024


def child(args: argparse.Namespace) -> None:
    """One variant's memory, as a JSON line on stdout."""
    enc, x = build(args, args.child)
    step(enc, x)  # allocates the gradients
    peak = step_peak_mb(enc, x)
    print(json.dumps({"step_peak_mb": peak, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def memory(args: argparse.Namespace, variant: str) -> dict:
    argv = [sys.executable, __file__, "--child", variant, "--preset", args.preset, "--batch", str(args.batch),
            "--width", str(args.width), "--channels", str(args.channels), "--device", args.device]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_times(args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per step of each variant, their steps alternating."""
    models = {v: build(args, v) for v in VARIANTS}
    assert all(torch.equal(a, b) for a, b in zip(*(m.state_dict().values() for m, _ in models.values())))
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(args.iters + 1):
        for v, (enc, x) in models.items():
            t0 = time.perf_counter()
            step(enc, x)
            if i:  # the first step of each is a warm-up
                times[v].append(time.perf_counter() - t0)
            enc.zero_grad(set_to_none=False)
    return {v: statistics.median(t) for v, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="swin_b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--width", type=int, default=128, help="crop width (time steps)")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--iters", type=int, default=3, help="timed steps per variant")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: torch's")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)

    enc, _ = build(args, "plain")
    params = param_count(enc)[1]
    del enc
    mem = {v: memory(args, v) for v in VARIANTS}
    sec = step_times(args)
    print(f"{args.preset} ({params / 1e6:.1f}M parameters), batch {args.batch} x {args.channels} x 128 x {args.width}, "
          f"fp32, {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'variant':<20} {'step peak above held (MB)':>26} {'process peak RSS (MB)':>22} "
          f"{'step (s, median of ' + str(args.iters) + ')':>24}")
    for v in VARIANTS:
        print(f"{v:<20} {mem[v]['step_peak_mb']:>26.0f} {mem[v]['max_rss_mb']:>22.0f} {sec[v]:>24.2f}")
    ratio = {k: mem["grad_checkpointing"][k] / mem["plain"][k] for k in ("step_peak_mb", "max_rss_mb")}
    print(f"{'checkpointing/plain':<20} {ratio['step_peak_mb']:>26.2f} {ratio['max_rss_mb']:>22.2f} "
          f"{sec['grad_checkpointing'] / sec['plain']:>24.2f}")


if __name__ == "__main__":
    main()
