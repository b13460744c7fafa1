"""Note cache vs dense roll cache: size on disk, identical items, DataLoader throughput, start-up.

    python benchmarks/bench_notecache.py --dense DENSE_CACHE --notes NOTE_CACHE [--check 3000]
    python benchmarks/bench_notecache.py --startup NOTE_CACHE [NOTE_CACHE ...]   # start-up only
    python benchmarks/bench_notecache.py --convert DENSE_CACHE OUT   # a note cache made from a dense one

`--convert` recovers each piece's notes from its dense roll (a note starts where the frame
switches on or the onset channel marks one, and lasts to the next start or the frame's end):
they paint the identical roll, but unisons and overlapping notes of one pitch become one note,
so the result can be a little smaller than what `prepare` writes from the sources. It is for
measuring a corpus without parsing it again (binary rolls only).

DENSE_CACHE is a cache written by an earlier version (dense `(C, 128, T)` rolls), NOTE_CACHE one
written by this version's `midi-rae prepare` from the same inputs. Both are only read.

- size: bytes allocated on disk (st_blocks) of every file of each cache;
- identity: `--check` training items (spread over the epoch, two epochs) of `PianoRollDataset`
  with the training defaults (crop 128, pairs, time shift 16, pitch shift 6, transpose 0 and 6)
  compared with torch.equal, key by key;
- throughput: crops per second through a DataLoader (batch 32, shuffled with a fixed seed, the
  first batch not timed), 1 and 2 workers, dense and notes alternating, best of `--repeats`;
- start-up: wall time and resident memory (RSS) added in a fresh process that builds the training Dataset and
  reads one item (RSS from after the imports to after the item).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset


def roll_notes(roll: np.ndarray) -> np.ndarray:
    """(2, 128, T) binary roll -> the fewest notes that paint it, NOTE_DTYPE sorted like prepare's."""
    from midi_rae.roll import NOTE_DTYPE

    on = roll[0] > 0
    prev = np.zeros_like(on)
    prev[:, 1:] = on[:, :-1]
    starts = on & (~prev | (roll[1] > 0))  # (128, T)
    rows = []
    for pitch in np.flatnonzero(starts.any(axis=1)):
        s = np.flatnonzero(starts[pitch])
        offs = np.flatnonzero(on[pitch] & ~np.append(on[pitch, 1:], False)) + 1
        ends = np.minimum(np.append(s[1:], on.shape[1]), offs[np.searchsorted(offs, s, side="right")])
        rows.append((s, ends - s, np.full(len(s), pitch)))
    notes = np.zeros(sum(len(r[0]) for r in rows), NOTE_DTYPE)
    for name, i in (("start", 0), ("duration", 1), ("pitch", 2)):
        notes[name] = np.concatenate([r[i] for r in rows])
    notes["velocity"] = 1
    return notes[np.lexsort((notes["velocity"], notes["duration"], notes["pitch"], notes["start"]))]


def convert(dense: Path, out: Path) -> None:
    """Write a note cache at `out` holding the pieces of the dense cache `dense` (see the docstring)."""
    from midi_rae import cache as cache_module

    settings = cache_module.load_settings(dense)
    assert not settings.velocity, "--convert reads binary rolls only"
    for sub in ("notes", "staging"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    records = []
    for f in sorted((dense / "done").glob("*.json")):
        r = json.loads(f.read_text())
        r["key"] = f.stem
        parts, offset = [], 0
        for p in r["pieces"]:
            notes = roll_notes(np.load(dense / "rolls" / p.pop("roll")))
            p.update(file=f"staging/{f.stem}.npy", offset=offset, count=len(notes), notes=len(notes))
            parts.append(notes)
            offset += len(notes)
        if parts:
            cache_module._save_notes(out / f"staging/{f.stem}.npy", parts)
        records.append(r)
    records.sort(key=lambda r: r["source"])
    cache_module._pack(out, records, settings, progress=False)


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
import json, sys, time
from midi_rae.dataset import PianoRollDataset
import torch
def rss_kb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))
rss0 = rss_kb()
t = time.perf_counter()
ds = PianoRollDataset(sys.argv[1], "train")
ds[len(ds) // 2]
n = ds.num_pieces
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "rss_kb": rss_kb() - rss0, "pieces": n}))
"""


def startup(cache: Path | str) -> dict:
    out = subprocess.run([sys.executable, "-c", STARTUP, str(cache)], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def report_startup(caches: list[Path]) -> None:
    for c in caches:
        r = startup(c)
        print(f"start-up {c.name}: {r['pieces']} training pieces, {r['seconds'] * 1e3:.0f} ms, "
              f"RSS +{r['rss_kb'] / 1024:.1f} MB (Dataset built, one item read)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", type=Path)
    ap.add_argument("--notes", type=Path)
    ap.add_argument("--check", type=int, default=3000, help="items compared for identity (0: skip)")
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--startup", type=Path, nargs="*", default=[], help="more caches to time the start-up of")
    ap.add_argument("--convert", type=Path, nargs=2, metavar=("DENSE_CACHE", "OUT"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.convert:
        t = time.perf_counter()
        convert(*args.convert)
        print(f"converted {args.convert[0].name} -> {args.convert[1]} in {time.perf_counter() - t:.0f} s")
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
