"""Data benchmarks: MIDI -> roll throughput (ours vs pretty_midi), and `midi-rae prepare` wall time.

    pip install pretty_midi        # for the comparison only; not a dependency of midi-rae
    python benchmarks/bench_data.py                # both parts
    python benchmarks/bench_data.py --skip-prepare # throughput only

Files: every MIDI file shipped inside the music21 wheel (its test files and two Mozart
excerpts). Both sides make the same thing: a 128 x T binary frame roll at 4 steps per beat
(pretty_midi: get_piano_roll sampled at the tempo-derived step rate, excluding drums).
The prepare part converts the whole bundled corpus into a fresh temporary cache.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from midi_rae.roll import RollSettings, midi_to_roll


def midi_files() -> list[Path]:
    import music21

    return sorted(Path(music21.__file__).parent.rglob("*.mid"))


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_throughput(repeats: int) -> None:
    files = midi_files()
    data = [f.read_bytes() for f in files]  # from memory: measure parsing, not the disk
    settings = RollSettings(onset=False)
    ours = best_of(lambda: [midi_to_roll(d, settings) for d in data], repeats)
    print(f"files: {len(files)} MIDI files from the music21 wheel, {sum(map(len, data)) / 1e3:.0f} kB")
    print(f"midi_rae.roll.midi_to_roll: {ours * 1e3:8.1f} ms  ({len(files) / ours:8.0f} files/s)")
    try:
        import io

        import pretty_midi
    except ImportError:
        print("pretty_midi is not installed: `pip install pretty_midi` for the comparison")
        return

    def pm_roll(d: bytes) -> np.ndarray:
        pm = pretty_midi.PrettyMIDI(io.BytesIO(d))
        # 4 steps per beat: sample at 4 * the first tempo in beats per second.
        fs = 4 * pm.get_tempo_changes()[1][0] / 60 if len(pm.get_tempo_changes()[1]) else 8.0
        pm.instruments = [i for i in pm.instruments if not i.is_drum]
        return (pm.get_piano_roll(fs=fs) > 0).astype(np.uint8)

    warnings.simplefilter("ignore")  # pretty_midi warns about meta events on non-zero tracks
    theirs = best_of(lambda: [pm_roll(d) for d in data], max(1, repeats // 5))
    print(f"pretty_midi get_piano_roll:  {theirs * 1e3:8.1f} ms  ({len(files) / theirs:8.0f} files/s)")
    print(f"speed-up: {theirs / ours:.0f}x (target >= 50x)")


def bench_prepare(workers: int | None) -> None:
    from midi_rae.cache import prepare

    cache = Path(tempfile.mkdtemp(prefix="midi-rae-bench-"))
    try:
        t = time.perf_counter()
        summary = prepare(cache_dir=cache, workers=workers, progress=False)
        first = time.perf_counter() - t
        # CPU seconds of the (finished) worker processes: wall time on an otherwise idle machine
        # is about this divided by the number of workers, whatever else was running meanwhile.
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_s = cpu.ru_utime + cpu.ru_stime
        t = time.perf_counter()
        prepare(cache_dir=cache, workers=workers, progress=False)
        second = time.perf_counter() - t
        size = sum(f.stat().st_size for f in (cache / "rolls").iterdir())
        print(f"prepare (bundled corpus, {workers or len(os.sched_getaffinity(0))} workers): {first:.1f} s; "
              f"second run (no-op): {second:.1f} s")
        print(f"worker CPU time: {cpu_s:.0f} s (= {cpu_s / (workers or len(os.sched_getaffinity(0))):.0f} s per core)")
        print(summary.line())
        print(f"cache size: {size / 1e6:.0f} MB of rolls")
        for line in summary.report:
            print("  " + line)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--skip-prepare", action="store_true")
    args = ap.parse_args()
    bench_throughput(args.repeats)
    if not args.skip_prepare:
        bench_prepare(args.workers)
