"""Command line interface: `midi-rae <command> ...`, one subparser per command."""
from __future__ import annotations

import argparse
import errno
import sys
from typing import Callable

from midi_rae.data import RollSettings


def _add_prepare(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    from midi_rae.prepare import MAX_FILE_MB

    p = sub.add_parser(
        "prepare",
        help="convert music files (default: the bundled music21 corpus) into a roll cache",
        description="Convert MIDI (.mid .midi .kar), ABC, MusicXML, kern and other formats music21 reads "
        "into piano rolls plus a metadata table. With no PATH, the music corpus bundled with music21 is used. "
        "Resumable: finished files are not converted again.",
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="files or folders (searched recursively)")
    p.add_argument("--cache-dir", help="where to write the cache (default: $MIDI_RAE_CACHE or ~/.cache/midi-rae, "
                   "then /corpus for the bundled corpus, /corpus-<NAMEs> with --collections, or /data-<hash of the PATHs>)")
    p.add_argument("--steps-per-beat", type=int, default=4, help="time steps per quarter note (default 4)")
    p.add_argument("--no-onset", action="store_true", help="store the frame channel only (no onset channel)")
    p.add_argument("--velocity", action="store_true", help="store velocities (1..127) instead of 0/1")
    p.add_argument("--drums", action="store_true", help="include drum tracks")
    p.add_argument("--workers", type=int, help="worker processes (default: all cores)")
    p.add_argument("--collections", nargs="+", metavar="NAME", help="bundled corpus only: restrict to these folders (e.g. bach essenFolksong)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no skip lines; summary only")
    p.add_argument("--max-file-mb", type=float, default=MAX_FILE_MB, metavar="MB",
                   help=f"skip (and report) files larger than this (default {MAX_FILE_MB})")

    def run(args: argparse.Namespace) -> int:
        from midi_rae.prepare import prepare

        settings = RollSettings(args.steps_per_beat, onset=not args.no_onset, velocity=args.velocity, drums=args.drums)
        summary = prepare(args.paths or None, args.cache_dir, settings, workers=args.workers,
                          progress=not args.quiet, collections=args.collections, max_file_mb=args.max_file_mb)
        if not args.quiet:
            for line in summary.report:
                print(line)
        print(summary.line())
        print(f"{summary.processed} files converted in this run, {summary.files - summary.processed} were already in the cache")
        print(f"cache: {summary.cache_dir}  (report: {summary.cache_dir / 'report.txt'})")
        if summary.pieces == 0:  # nothing to train on: a script chaining prepare -> train must stop here
            print(f"midi-rae prepare: error: none of the {summary.files} files gave a usable piece (reasons in "
                  f"{summary.cache_dir / 'report.txt'}); give MIDI, ABC or MusicXML files with notes", file=sys.stderr)
            return 1
        return 0

    return run


def _add_training(name: str) -> Callable[[argparse._SubParsersAction], Callable[[argparse.Namespace], int]]:
    def add(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
        from midi_rae import train

        return {"train": train.add_train, "train-decoder": train.add_train_decoder, "run": train.add_run}[name](sub)

    return add


def _add_from(module: str, name: str) -> Callable[[argparse._SubParsersAction], Callable[[argparse.Namespace], int]]:
    """A command defined as `add_<name>(sub)` in `midi_rae.<module>` (imported when the CLI starts)."""
    def add(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
        import importlib

        return getattr(importlib.import_module(f"midi_rae.{module}"), name)(sub)

    return add


# New commands (train, encode, ...) add a `_add_<name>` here; each returns its run function.
COMMANDS = {"prepare": _add_prepare, "train": _add_training("train"), "train-decoder": _add_training("train-decoder"),
            "run": _add_training("run"), "encode": _add_from("encode", "add_encode"),
            "reconstruct": _add_from("reconstruct", "add_reconstruct"), "eval": _add_from("evaluate", "add_eval"),
            "probe": _add_from("probe", "add_probe"), "levels": _add_from("levels", "add_levels")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="midi-rae", description="Hierarchical representations of symbolic music.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runners = {name: add(sub) for name, add in COMMANDS.items()}
    args = parser.parse_args(argv)
    try:
        return runners[args.command](args)
    # User and system errors (bad paths and files, a full disk, a config that cannot work: ConfigError
    # and BadInput are ValueErrors) get one line; anything else is a bug and keeps its traceback.
    except (OSError, ValueError) as e:
        print(f"midi-rae {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2


# What to change, by the errno of an OSError (the OS's own text says what went wrong).
_HINTS = {errno.ENOSPC: "free some disk space or write to another disk",
          errno.EDQUOT: "free some space or write elsewhere",
          errno.EACCES: "check its permissions or choose another path",
          errno.EPERM: "check its permissions or choose another path",
          errno.EROFS: "write somewhere else",
          errno.EISDIR: "it is a folder: give a file name",
          errno.ENOTDIR: "a part of that path is a file, not a folder",
          errno.ENOENT: "check the path (create the folder first when writing)"}


def _message(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename is not None else ""
        hint = _HINTS.get(e.errno)
        return f"{where}{e.strerror}" + (f"; {hint}" if hint else "")
    return str(e)
