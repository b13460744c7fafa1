"""A generated corpus of small MIDI files for scale tests, written with the package's own
roll-to-MIDI code (`midi_rae.roll.roll_to_midi`); the same seed gives the same files.

    python benchmarks/make_corpus.py OUT --files 10000 --seed 0 [--bad-every 500]

Each file is a random piece of 8 to 64 beats at 4 steps per beat: a melody line over held
chords, so that it has onsets, repeated notes and overlapping voices. Every `--bad-every`-th
file is broken on purpose (cut short, or not MIDI at all) so that `prepare` has files to skip
and report. Files go in folders of 1,000.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from midi_rae.roll import roll_to_midi


def random_roll(rng: np.random.Generator) -> np.ndarray:
    """(2, 128, T) uint8: frame and onsets of a melody over chords, T = 4 steps per beat."""
    steps = 4 * int(rng.integers(8, 65))
    roll = np.zeros((2, 128, steps), np.uint8)
    t, pitch = 0, int(rng.integers(60, 76))
    while t < steps:  # melody: steps of a scale-ish walk, durations of 1 to 8 steps
        dur = int(rng.choice([1, 2, 2, 4, 4, 8]))
        pitch = int(np.clip(pitch + rng.integers(-4, 5), 48, 96))
        roll[0, pitch, t:t + dur] = 1
        roll[1, pitch, t] = 1
        t += dur
    for bar in range(0, steps, 16):  # a held triad per bar
        root = int(rng.integers(36, 55))
        for p in (root, root + 3 + int(rng.integers(0, 2)), root + 7):
            roll[0, p, bar:bar + 16] = 1
            roll[1, p, bar] = 1
    return roll


def make_corpus(out: Path, files: int, seed: int = 0, bad_every: int = 0) -> list[Path]:
    """Write `files` MIDI files under `out` (folders of 1,000); returns their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(files):
        path = out / f"{i // 1000:04d}" / f"piece{i:06d}.mid"
        path.parent.mkdir(parents=True, exist_ok=True)
        roll_to_midi(random_roll(rng), path)
        if bad_every and i % bad_every == bad_every - 1:  # broken on purpose: cut short, or text
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2] if (i // bad_every) % 2 else b"not a MIDI file\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bad-every", type=int, default=500, help="break every Nth file on purpose (0: none)")
    args = ap.parse_args()
    make_corpus(args.out, args.files, args.seed, args.bad_every)
    print(f"{args.files} files under {args.out}")
