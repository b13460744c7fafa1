"""`midi-rae prepare`: convert music files into the note cache that training reads (`midi_rae.cache`)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from midi_rae.cache import MAX_FILE_MB, prepare
from midi_rae.roll import RollSettings


def add_prepare(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser(
        "prepare",
        help="convert music files (default: the bundled music21 corpus) into a note cache",
        description="Convert MIDI (.mid .midi .kar), ABC, MusicXML, kern and other formats music21 reads "
        "into a note cache (each piece's notes, from which training paints piano-roll crops) plus a metadata table. With no PATH, the music corpus bundled with music21 is used. "
        "Resumable: finished files are not converted again.",
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="files or folders (searched recursively)")
    p.add_argument("--cache-dir", help="where to write the cache (default: $MIDI_RAE_CACHE or ~/.cache/midi-rae, "
                   "then /corpus for the bundled corpus, /corpus-<NAMEs> with --collections, or /data-<hash of the PATHs>)")
    p.add_argument("--steps-per-beat", type=int, default=4,
                   help="time steps per quarter note (default 4; 12 places eighth and sixteenth triplets exactly). "
                        "A run reads it with data.steps_per_beat set to the same value")
    p.add_argument("--expand-repeats", action=argparse.BooleanOptionalAction, default=True,
                   help="play repeated sections (repeat signs, first / second endings, da capo) as written out: "
                        "MusicXML, kern and ABC; MIDI is already played out (default: on)")
    p.add_argument("--no-onset", action="store_true", help="store the frame channel only (no onset channel)")
    p.add_argument("--velocity", action="store_true", help="store velocities (1..127) instead of 0/1")
    p.add_argument("--drums", action="store_true", help="include drum tracks")
    p.add_argument("--workers", type=int, help="worker processes (default: all cores)")
    p.add_argument("--collections", nargs="+", metavar="NAME", help="bundled corpus only: restrict to these folders (e.g. bach essenFolksong)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no skip lines; summary only")
    p.add_argument("--max-file-mb", type=float, default=MAX_FILE_MB, metavar="MB",
                   help=f"skip (and report) files larger than this (default {MAX_FILE_MB})")

    def run(args: argparse.Namespace) -> int:
        if args.paths and args.collections:  # PATHs replace the bundled corpus, whose folders --collections picks
            raise ValueError("--collections picks folders of the bundled corpus, which PATHs replace; give either "
                             "PATHs or --collections, not both")
        settings = RollSettings(args.steps_per_beat, onset=not args.no_onset, velocity=args.velocity, drums=args.drums,
                                expand_repeats=args.expand_repeats)
        summary = prepare(args.paths or None, args.cache_dir, settings, workers=args.workers,
                          progress=not args.quiet, collections=args.collections, max_file_mb=args.max_file_mb)
        if not args.quiet:
            for line in summary.report:
                print(line)
        if summary.notice:
            print(summary.notice)
        print(summary.line())
        cached = summary.files - summary.processed - summary.refused
        print(f"{summary.processed} files converted in this run, {cached} were already in the cache"
              + (f", {summary.refused} refused before reading (above)" if summary.refused else ""))
        print(f"cache: {summary.cache_dir}  (report: {summary.cache_dir / 'report.txt'})")
        if summary.pieces == 0:  # nothing to train on: a script chaining prepare -> train must stop here
            print(f"midi-rae prepare: error: none of the {summary.files} files gave a usable piece (reasons in "
                  f"{summary.cache_dir / 'report.txt'}); give MIDI, ABC or MusicXML files with notes", file=sys.stderr)
            return 1
        return 0

    return run
