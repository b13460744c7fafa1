"""The whole pretraining step as `midi-rae train` runs it: samples/s, where the time goes, FLOPs.

    PYTHONPATH=. python benchmarks/bench_train.py                                # quickstart, swin_midi, reference
    PYTHONPATH=. python benchmarks/bench_train.py train.threads=1 --presets quickstart --compare 9d16fc6
    PYTHONPATH=. python benchmarks/bench_train.py --presets quickstart --profile  # + torch.profiler table

What runs is the package's own code: the model, data and optimizer are built as
`midi_rae.stages.pretrain` builds them (`Pretrainer`, `runs.datasets`, `trainer.Trainer`, whose
`on_step` logs as in training) and the steps are `engine.train_one_epoch` over the trainer's
`epoch_loader`: data loading and augmentation, every objective the preset switches on, backward,
gradient clipping, the AdamW step and the EMA teacher update. Validation and checkpoints are
turned off (`eval_every=0`, `ckpt_every` past the end): they are not part of the step. The cache is
the one the preset names (bundled corpus caches must exist; `midi-rae prepare` makes them).

Each (version, preset) trains in its own worker process (the same script with `--worker`), so two
versions of the package never share one interpreter and each has its own memory peak; the parent
lets them run `--chunk` steps in turn, so that load from other processes hits both alike. Per step
(from asking the loader for the batch to the end of `on_step`) the wall time and the worker's CPU
time are recorded; figures are medians over the steps after `--warmup`. On a machine shared with
other jobs the wall time mostly measures the scheduler, while the CPU time of a one-thread worker
(`train.threads=1`, in-process loading as the presets have it) is the step's own compute: give
`train.threads=1` there and read the CPU columns. The phases are CPU times measured by wrapping the
methods of the real objects: data = inside the loader, encoder = the encoder and EMA teacher forwards, heads =
decoder / predictor / projector forwards (and the decoder's `patch_logits`), losses = the rest of the model's forward, backward = from
the end of the forward to the optimizer step (loss sync, zero_grad, backward, clip_grad_norm),
optimizer = the AdamW step, rest = EMA update and logging. Under `train.compile=true` wrappers inside
the compiled model are traced through: only data, optimizer and the step totals are meaningful there, and
the first step (compilation) is reported apart.

FLOPs: one more step under `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions,
attention: forward and backward), divided by the batch size; achieved GFLOP/s = FLOPs per step /
(median step CPU time / threads), against the best of ten 1024 x 1024 fp32 matmuls timed the same
way in the same worker. Memory: the peak resident set during the timed steps (VmHWM, reset through
/proc/self/clear_refs; Linux only) and its growth over the resident set before the first step.

On a GPU (`train.device=cuda`; bf16 autocast unless `train.amp=false`) every CPU time above is
instead the wall time after `torch.cuda.synchronize()` (so a phase holds its kernels, at the
cost of one sync per phase boundary), the matmul peak is 8192 x 8192 in the step's precision,
and the table adds the peak GPU allocation.

`--against KEY=VALUE ...`: the same presets also run with this tree and these overrides added,
alternating in the same way; prints the step-time ratio (the cost of an option).

`--compare REF`: the same presets also run with the package at git revision REF (extracted with
`git archive` into a temporary folder), alternating with this tree; prints the step-time ratio
REF / this and checks that the losses of every step (`--warmup` + `--steps`) agree to LOSS_RTOL
(same seed, same data).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("quickstart", "swin_midi", "reference")
PHASES = ("data", "encoder", "heads", "losses", "backward", "optimizer", "rest")
LOSS_RTOL = 1e-4  # relative tolerance on each step's loss between two versions (fp32, same seed and data)


# ----------------------------------------------------------------------------- worker: one version, one preset


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """Reset VmHWM to the current resident set (after handing freed heap back); returns it in kB."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_kb("VmRSS")


def matmul_peak_gflops(torch, device, amp: bool, repeats: int = 10) -> float:
    """GFLOP/s of the best of `repeats` square matmuls: on CPU 1024 x 1024 fp32 by CPU time per
    thread; on CUDA 8192 x 8192 in the step's precision (bf16 under train.amp) by synchronised wall time."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if cuda and amp else torch.float32)
    b = torch.randn_like(a)
    clock, per = step_clock(torch, device)
    for _ in range(3 if cuda else 0):  # CUDA: let the clocks rise and cuBLAS pick its kernel first
        a @ b
    best = math.inf
    for _ in range(repeats):
        t0 = clock()
        a @ b
        best = min(best, (clock() - t0) / per)
    return 2 * n**3 / best / 1e9


def step_clock(torch, device) -> tuple:
    """(clock, divisor): the clock the phases and steps are timed with, and what a time on it is
    divided by to give the seconds one core (CPU) or the GPU spent. CPU: process time over the
    threads. CUDA: wall time after synchronising, so that each phase's kernels are counted in it."""
    if device.type != "cuda":
        return time.process_time, torch.get_num_threads()

    def synced() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return synced, 1


class PhaseClock:
    """CPU time of each phase of a step, from wrappers around the methods of the model, its
    submodules and the optimizer that the step calls (the package is left as it is)."""

    def __init__(self, model, optimizer, clock) -> None:
        self.clock = clock
        self.times = dict.fromkeys(PHASES, 0.0)
        self.forward_end = 0.0
        self._wrap(model, "forward", "forward")
        for name in ("encoder", "teacher"):
            if getattr(model, name, None) is not None:
                self._wrap(getattr(model, name), "forward", "encoder")
        for name in ("mae_decoder", "predictor", "ms_heads", "projector"):
            head = getattr(model, name, None)
            for method in ("forward", "patch_logits"):  # patch_logits: the decoder's masked-patch path
                if head is not None and hasattr(head, method):
                    self._wrap(head, method, "heads")
        optimizer.register_step_pre_hook(lambda *_: self._step_pre())
        optimizer.register_step_post_hook(lambda *_: self._step_post())

    def _wrap(self, obj, method: str, phase: str) -> None:
        inner = getattr(obj, method)

        def timed(*args, **kwargs):
            t0 = self.clock()
            out = inner(*args, **kwargs)
            now = self.clock()
            self.times["losses" if phase == "forward" else phase] += now - t0
            if phase == "forward":
                self.forward_end = now
            return out

        setattr(obj, method, timed)  # an instance attribute: nn.Module.__call__ finds it first

    def _step_pre(self) -> None:
        self._opt_start = self.clock()
        self.times["backward"] += self._opt_start - self.forward_end

    def _step_post(self) -> None:
        self.times["optimizer"] += self.clock() - self._opt_start

    def take(self) -> dict[str, float]:
        """The phase times since the last call; losses = the forward minus encoder and heads."""
        t = self.times
        t["losses"] -= t["encoder"] + t["heads"]
        self.times = dict.fromkeys(PHASES, 0.0)
        return t


class SteppedLoader:
    """The trainer's loader, paused every `chunk` steps until the parent says go (or stop), with
    the time spent fetching each batch and each step's wall time recorded."""

    def __init__(self, loader, clock: PhaseClock, chan_in, chan_out) -> None:
        self.loader, self.clock, self.chan_in, self.chan_out = loader, clock, chan_in, chan_out
        self.records: list[dict] = []
        self.losses: list[float] = []

    def __iter__(self):
        it = iter(self.loader)
        budget = self._wait()
        while budget:
            t0, c0 = time.perf_counter(), self.clock.clock()
            batch = next(it)
            c1 = self.clock.clock()
            self.clock.times["data"] += c1 - c0
            yield batch
            c_end = self.clock.clock()
            end = time.perf_counter()
            phases = self.clock.take()
            phases["rest"] = (c_end - c1) - sum(v for k, v in phases.items() if k != "data")
            self.records.append({"step": end - t0, "cpu": c_end - c0, **phases})
            budget -= 1
            if budget == 0:
                self._send({"records": self.records, "losses": self.losses})
                self.records, self.losses = [], []
                budget = self._wait()

    def _wait(self) -> int:
        cmd = self.chan_in.readline().split()
        return int(cmd[1]) if cmd and cmd[0] == "run" else 0

    def _send(self, obj: dict) -> None:
        self.chan_out.write(json.dumps(obj) + "\n")
        self.chan_out.flush()


def worker(preset: str, overrides: list[str], profile: bool) -> None:
    """Build the preset's pretraining as `stages.pretrain` does, then train on the parent's word."""
    import torch
    import torch.profiler
    from torch.utils.flop_counter import FlopCounterMode

    from midi_rae.config import load_config, resolve_config_path
    from midi_rae.distributed import setup
    from midi_rae.engine import train_one_epoch
    from midi_rae.models import Pretrainer
    from midi_rae.runs import datasets
    from midi_rae.stages import seed_all
    from midi_rae.trainer import Trainer, epoch_loader

    chan_out = os.fdopen(os.dup(1), "w")
    sys.stdout = sys.stderr  # the package's prints must not reach the parent's channel
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = load_config(resolve_config_path(preset), [f"out_dir={out_dir}", "train.eval_every=0",
                                                        "train.ckpt_every=1000000000", "train.progress=false",
                                                        *overrides])
        tcfg = cfg.train
        d = setup(tcfg)
        seed_all(tcfg.seed)
        model = Pretrainer(cfg).to(d.device)
        seed_all(tcfg.seed + d.rank)
        train_ds, val = datasets(cfg, tcfg.seed, model.needs_views)
        momentum = (cfg.objective.ema_momentum, cfg.objective.ema_momentum_end) if model.teacher is not None else None
        trainer = Trainer("pretrain", cfg, model, d, Path(out_dir) / "pretrain", train_ds, val, lambda *_: {}, "loss",
                          teacher_momentum=momentum)
        timer, per = step_clock(torch, d.device)
        clock = PhaseClock(model, trainer.optimizer, timer)
        peak = matmul_peak_gflops(torch, d.device, tcfg.amp)
        chan_out.write(json.dumps({"ready": True, "batch_size": tcfg.batch_size, "threads": torch.get_num_threads(),
                                   "per": per, "device": str(d.device), "matmul_gflops": peak}) + "\n")
        chan_out.flush()

        loader = SteppedLoader(epoch_loader(train_ds, tcfg, d, 0, 0, trainer.spe, cfg.data.num_workers), clock,
                               sys.stdin, chan_out)
        on_step = trainer.on_step

        def logged_step(step: int, stats: dict) -> None:
            loader.losses.append(stats["loss"])
            on_step(step, stats)

        rss_before = reset_peak_rss()
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        update = trainer.update_teacher if momentum is not None else None
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else nullcontext() as prof:
            stats = train_one_epoch(trainer.model, loader, trainer.optimizer, step=0, total_steps=trainer.total,
                                    cfg=tcfg, device=d.device, epoch=0, update_teacher=update, on_step=logged_step)
        if profile:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40), file=sys.stderr)
        peak_rss = rss_kb("VmHWM")
        gpu_peak = torch.cuda.max_memory_allocated(d.device) / 2**20 if d.device.type == "cuda" else None
        # One more step, counted: FLOPs of forward and backward (the optimizer does no matmuls).
        batch = next(iter(epoch_loader(train_ds, tcfg, d, 1, 0, trainer.spe, 0)))
        with FlopCounterMode(display=False) as counter:
            train_one_epoch(trainer.model, [batch], trainer.optimizer, step=stats["step"], total_steps=trainer.total,
                            cfg=tcfg, device=d.device, epoch=1, update_teacher=update)
        trainer.log.close()
        chan_out.write(json.dumps({"flops_per_sample": counter.get_total_flops() / tcfg.batch_size,
                                   "peak_rss_mb": peak_rss / 1024, "step_rss_growth_mb": (peak_rss - rss_before) / 1024,
                                   "gpu_peak_mb": gpu_peak, "matmul_gflops_end": matmul_peak_gflops(torch, d.device, tcfg.amp)})
                       + "\n")
        chan_out.flush()


# ----------------------------------------------------------------------------- parent: alternate, summarise


class Worker:
    def __init__(self, label: str, tree: Path, preset: str, overrides: list[str], profile: bool = False) -> None:
        self.label = label
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", preset, *overrides, *(["--profile"] if profile else [])]
        self.proc = subprocess.Popen(cmd,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tree)
        self.info = self._read()
        self.records: list[dict] = []
        self.losses: list[float] = []

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.label} worker stopped (its error is above)")
        return json.loads(line)

    def run(self, n: int) -> None:
        self.proc.stdin.write(f"run {n}\n")
        self.proc.stdin.flush()
        got = self._read()
        self.records += got["records"]
        self.losses += got["losses"]

    def finish(self) -> None:
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        self.info.update(self._read())
        self.proc.wait()


def summary(w: Worker, warmup: int) -> dict:
    recs = w.records[warmup:]
    med = {k: statistics.median(r[k] for r in recs) for k in ("step", "cpu", *PHASES)}
    bs = w.info["batch_size"]
    flops = w.info["flops_per_sample"] * bs
    return {"median_step_s": med["step"], "median_step_cpu_s": med["cpu"], "samples_per_s": bs / med["step"], "phases_s": {k: med[k] for k in PHASES},
            "first_step_s": w.records[0]["step"], "gflop_per_sample": w.info["flops_per_sample"] / 1e9,
            "achieved_gflops": flops / (med["cpu"] / w.info["per"]) / 1e9, "matmul_gflops": max(w.info["matmul_gflops"], w.info["matmul_gflops_end"]),
            "peak_rss_mb": w.info["peak_rss_mb"], "step_rss_growth_mb": w.info["step_rss_growth_mb"],
            "gpu_peak_mb": w.info["gpu_peak_mb"], "device": w.info["device"], "batch_size": bs, "threads": w.info["threads"]}


def print_table(preset: str, rows: dict[str, dict]) -> None:
    cuda = any(s["gpu_peak_mb"] is not None for s in rows.values())
    print(f"\n### {preset} ({', '.join(sorted({s['device'] for s in rows.values()}))})")
    if cuda:
        print("CUDA: the step and phase times are synchronised wall times (the CPU-ms columns too), the "
              "matmul peak is 8192 x 8192 in the step's precision, and GPU peak MB is torch's peak allocation.")
    print("| version | batch | threads | step ms | step CPU ms | samples/s | " + " | ".join(f"{p} ms" for p in PHASES)
          + " | GFLOP/sample | GFLOP/s | matmul peak GFLOP/s | % of peak | peak RSS MB | step RSS growth MB |"
          + (" GPU peak MB |" if cuda else ""))
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * len(PHASES) + "---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else ""))
    for label, s in rows.items():
        phases = " | ".join(f"{1e3 * s['phases_s'][p]:.1f}" for p in PHASES)
        print(f"| {label} | {s['batch_size']} | {s['threads']} | {1e3 * s['median_step_s']:.1f} | {1e3 * s['median_step_cpu_s']:.1f} | {s['samples_per_s']:.1f} | "
              f"{phases} | {s['gflop_per_sample']:.4f} | {s['achieved_gflops']:.2f} | {s['matmul_gflops']:.1f} | "
              f"{100 * s['achieved_gflops'] / s['matmul_gflops']:.2f} | {s['peak_rss_mb']:.0f} | {s['step_rss_growth_mb']:.0f} |"
              + (f" {s['gpu_peak_mb']:.0f} |" if cuda else ""))
    # The first step apart: under train.compile it is the compilation, forward and backward.
    print("first step (compilation under train.compile=true): "
          + ", ".join(f"{label} {s['first_step_s']:.1f} s" for label, s in rows.items()))


def losses_agree(a: list[float], b: list[float]) -> tuple[bool, float]:
    """Whether two runs' losses agree step by step to LOSS_RTOL, and the worst relative difference."""
    if len(a) != len(b):
        return False, math.inf
    worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))
    return worst <= LOSS_RTOL, worst


def extract(ref: str, dest: Path) -> Path:
    """The package at git revision `ref`, as files under `dest` (nothing in the repository changes)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def compare(args: argparse.Namespace) -> None:
    results: dict[str, dict] = {}
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        # (label, tree, overrides) of each worker; the last is "this" (the one profiled).
        versions = [("this", ROOT, args.overrides)]
        if args.compare:
            versions.insert(0, (args.compare, extract(args.compare, Path(tmp)), args.overrides))
        elif args.against:
            versions.insert(0, (" ".join(args.against), ROOT, [*args.overrides, *args.against]))
        for preset in args.presets:
            workers = [Worker(label, tree, preset, overrides, args.profile and label == "this")
                       for label, tree, overrides in versions]
            total = args.warmup + args.steps
            for r in range(math.ceil(total / args.chunk)):
                for w in (workers if r % 2 == 0 else workers[::-1]):  # alternate who goes first
                    w.run(min(args.chunk, total - len(w.records)))
            for w in workers:
                w.finish()
            rows = {w.label: summary(w, args.warmup) for w in workers}
            print_table(preset, rows)
            out = {"rows": rows}
            if len(workers) == 2:
                base, new = workers
                # The ratio of step times, step by step in the order they alternated.
                ratios = [a["step"] / b["step"] for a, b in zip(base.records[args.warmup:], new.records[args.warmup:])]
                # Another configuration trains another objective: its losses are not expected to agree.
                ok, worst = losses_agree(base.losses, new.losses) if args.compare else (True, math.nan)
                out.update(ratio_median_steps=rows[base.label]["median_step_s"] / rows["this"]["median_step_s"],
                           ratio_median_cpu=rows[base.label]["median_step_cpu_s"] / rows["this"]["median_step_cpu_s"],
                           ratio_of_sums=sum(r["step"] for r in base.records[args.warmup:])
                           / sum(r["step"] for r in new.records[args.warmup:]),
                           ratio_stepwise_median=statistics.median(ratios),
                           losses_agree=ok, worst_loss_rel_diff=worst, losses={w.label: w.losses for w in workers})
                print(f"\nstep time {base.label} / this: {out['ratio_median_steps']:.3f} (median steps), "
                      f"{out['ratio_of_sums']:.3f} (sums), {out['ratio_stepwise_median']:.3f} (median of paired ratios), {out['ratio_median_cpu']:.3f} (median CPU time)"
                      + (f"; losses of all {total} steps agree to {LOSS_RTOL:g}: {ok} (worst relative "
                         f"difference {worst:.2e})" if args.compare else ""))
                if not ok:
                    failed.append(preset)
            results[preset] = out
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    if failed:
        raise SystemExit(f"losses differ from {args.compare} on {', '.join(failed)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every preset, e.g. train.compile=true")
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--steps", type=int, default=20, help="timed steps per version (and losses compared)")
    p.add_argument("--warmup", type=int, default=2, help="steps before the timed ones (not timed, losses compared)")
    p.add_argument("--chunk", type=int, default=2, help="steps a version runs before the other's turn")
    p.add_argument("--compare", metavar="REF", help="also run the package at this git revision, alternating")
    p.add_argument("--against", nargs="+", metavar="KEY=VALUE",
                   help="instead of --compare: also run this tree with these overrides added, alternating "
                        "(the cost of an option, e.g. objective.descriptor_weight=0; losses are not compared)")
    p.add_argument("--out", type=Path, help="write every figure as JSON here")
    p.add_argument("--profile", action="store_true",
                   help="print torch.profiler's top ops (by self CPU time) over this tree's steps (slows them down)")
    p.add_argument("--worker", metavar="PRESET", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.overrides, args.profile)
    else:
        compare(args)


if __name__ == "__main__":
    main()
