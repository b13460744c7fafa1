"""`midi-rae prepare` as the corpus grows: time per 1,000 files and peak memory at N files.

    python benchmarks/bench_scale.py --sizes 1000 5000 10000 --seed 0 --workers 2

For each N: a fresh corpus from `make_corpus.py` (same seed: the smaller corpora are the first
files of the larger), prepared into a fresh cache by `python -m midi_rae prepare` in its own
process; wall time, and the peak RSS of the largest process (prepare or one of its workers,
from the children's rusage). Then the start-up of the training Dataset on that cache.
With `--trace`: a second `prepare` over the finished cache (every file hashed, the records
indexed and packed again, nothing converted) in a child under tracemalloc: the Python heap's
peak per file, and the lines that hold most of it then.
"""
from __future__ import annotations

import argparse
import importlib.util
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRACE = """
import sys, tracemalloc
from midi_rae.cache import prepare
tracemalloc.start()
prepare([sys.argv[1]], sys.argv[2], workers=1, progress=False)
peak = tracemalloc.get_traced_memory()[1]
print(peak)
"""


def trace(n: int, corpus: Path, cache: Path) -> None:
    """The Python heap's peak during a second prepare of `corpus` into its finished `cache`."""
    # -P: no current folder in front of the path, so the child imports the midi_rae this script
    # was started with (PYTHONPATH, else the installed one), also when run from inside a checkout
    out = subprocess.run([sys.executable, "-P", "-c", TRACE, str(corpus), str(cache)], capture_output=True, text=True, check=True)
    peak = int(out.stdout.split()[-1])
    print(f"N={n}: second prepare over the finished cache: Python heap peak {peak / 1e6:.1f} MB, "
          f"{peak / n:.0f} bytes per file", flush=True)


def run(n: int, seed: int, workers: int, root: Path, traced: bool = False) -> None:
    corpus, cache = root / f"gen{n}", root / f"cache{n}"
    t = time.perf_counter()
    load("make_corpus").make_corpus(corpus, n, seed, bad_every=500)
    made = time.perf_counter() - t
    # ru_maxrss of the children is the largest single process reaped so far: run each N in a
    # fresh child of a fresh child, so that one N's peak does not hide the next one's.
    code = (f"import resource, subprocess, sys, time; t = time.perf_counter(); "
            f"r = subprocess.run([sys.executable, '-P', '-m', 'midi_rae', 'prepare', {str(corpus)!r}, '--cache-dir', {str(cache)!r}, "
            f"'--workers', '{workers}', '--quiet'], capture_output=True, text=True); "
            f"print(r.stdout.strip().splitlines()[0]); print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    seconds, rss = float(out[-1].split()[0]), int(out[-1].split()[1])
    size = sum(f.stat().st_blocks * 512 for f in cache.rglob("*") if f.is_file())
    startup = load("bench_notecache").startup(cache)
    print(f"N={n}: made in {made:.0f} s; prepare {seconds:.1f} s = {seconds / n * 1000:.1f} s per 1,000 files; "
          f"peak RSS {rss / 1024:.0f} MB; {out[0]}; cache {size / 1e6:.1f} MB; "
          f"Dataset start-up {startup['seconds'] * 1e3:.0f} ms, +{startup['rss_kb'] / 1024:.1f} MB", flush=True)
    if traced:
        trace(n, corpus, cache)
    shutil.rmtree(corpus)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="keep the caches here (default: a temporary folder, removed)")
    ap.add_argument("--trace", action="store_true", help="also the Python heap's peak of a second prepare (tracemalloc)")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="midi-rae-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        for n in args.sizes:
            run(n, args.seed, args.workers, root, args.trace)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
