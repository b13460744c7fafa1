"""Note cache vs dense roll cache: size on disk, identical items, DataLoader throughput, start-up.

    python benchmarks/bench_notecache.py --dense DENSE_CACHE --notes NOTE_CACHE [--check 3000]
    python benchmarks/bench_notecache.py --startup NOTE_CACHE [NOTE_CACHE ...]   # start-up only

DENSE_CACHE is a cache written by an earlier version (dense `(C, 128, T)` rolls), NOTE_CACHE one
written by this version's `midi-rae prepare` from the same inputs. Both are only read.

- size: bytes allocated on disk (st_blocks) of every file of each cache;
- identity: `--check` training items (spread over the epoch, two epochs) of `PianoRollDataset`
  with the training defaults (crop 128, pairs, time shift 16, pitch shift 6, transpose 0 and 6)
  compared with torch.equal, key by key;
- throughput: crops per second through a DataLoader (batch 32, shuffled with a fixed seed, the
  first batch not timed), 1 and 2 workers, dense and notes alternating, best of `--repeats`;
- start-up: wall time and peak RSS of a fresh process that builds the training Dataset and
  reads one item (RSS counted from after the imports).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset


def disk_bytes(root: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in root.rglob("*") if f.is_file())


def check_identity(dense: Path, notes: Path, n: int) -> None:
    from midi_rae.cache import load_index
    from midi_rae.dataset import PianoRollDataset

    a_ids = [p["piece_id"] for p in load_index(dense)]
    b_ids = [p["piece_id"] for p in load_index(notes)]
    print(f"pieces: dense {len(a_ids)}, notes {len(b_ids)}, same ids in the same order: {a_ids == b_ids}")
    if a_ids != b_ids:
        return
    checked = 0
    t = time.perf_counter()
    for transpose in (0, 6):
        a, b = PianoRollDataset(dense, "train", transpose=transpose), PianoRollDataset(notes, "train", transpose=transpose)
        assert len(a) == len(b)
        idx = range(0, len(a), max(1, len(a) // max(n // 4, 1)))
        for epoch in (0, 1):
            a.set_epoch(epoch), b.set_epoch(epoch)
            for i in idx:
                x, y = a[i], b[i]
                for k in x:
                    same = torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k]
                    if not same:
                        raise SystemExit(f"DIFFERENT: item {i} key {k} (epoch {epoch}, transpose {transpose})")
                checked += 1
    print(f"identity: {checked} items (x, x2, shifts, start, steps, piece ids) equal, torch.equal, "
          f"{len(a)} items per epoch ({time.perf_counter() - t:.0f} s)")


def crops_per_second(cache: Path, workers: int, batches: int) -> float:
    from midi_rae.dataset import PianoRollDataset

    ds = PianoRollDataset(cache, "train")
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(ds), generator=g)[: (batches + 1) * 32].tolist()
    loader = DataLoader(Subset(ds, order), batch_size=32, num_workers=workers, persistent_workers=False)
    it = iter(loader)
    next(it)  # workers started, first batch made: not timed
    t = time.perf_counter()
    n = sum(len(b["x"]) * 2 for b in it)  # two views per item: 2 crops
    return n / (time.perf_counter() - t)


STARTUP = """
import json, resource, sys, time
from midi_rae.dataset import PianoRollDataset
import torch
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
ds = PianoRollDataset(sys.argv[1], "train")
ds[len(ds) // 2]
n = ds.num_pieces
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0, "pieces": n}))
"""


def startup(cache: Path | str) -> dict:
    out = subprocess.run([sys.executable, "-c", STARTUP, str(cache)], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def report_startup(caches: list[Path]) -> None:
    for c in caches:
        r = startup(c)
        print(f"start-up {c.name}: {r['pieces']} training pieces, {r['seconds'] * 1e3:.0f} ms, "
              f"peak RSS +{r['rss_kb'] / 1024:.1f} MB (Dataset built, one item read)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", type=Path)
    ap.add_argument("--notes", type=Path)
    ap.add_argument("--check", type=int, default=3000, help="items compared for identity (0: skip)")
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--startup", type=Path, nargs="*", default=[], help="more caches to time the start-up of")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.dense and args.notes:
        d, n = disk_bytes(args.dense), disk_bytes(args.notes)
        print(f"size on disk: dense {d / 1e6:.1f} MB, notes {n / 1e6:.2f} MB: {d / n:.1f}x smaller")
        if args.check:
            check_identity(args.dense, args.notes, args.check)
        for workers in (1, 2):
            best = {"dense": 0.0, "notes": 0.0}
            for _ in range(args.repeats):
                for name, cache in (("dense", args.dense), ("notes", args.notes)):
                    best[name] = max(best[name], crops_per_second(cache, workers, args.batches))
            print(f"DataLoader, {workers} worker(s), batch 32, {args.batches} batches: dense {best['dense']:.0f} crops/s, "
                  f"notes {best['notes']:.0f} crops/s: {best['notes'] / best['dense']:.2f}x")
        report_startup([args.dense, args.notes])
    report_startup(args.startup)
