"""Command line interface: `midi-rae <command> ...`, one subparser per command."""
from __future__ import annotations

import argparse
import errno
import sys
from typing import Callable

import torch.distributed as dist


def _add_from(module: str, name: str) -> Callable[[argparse._SubParsersAction], Callable[[argparse.Namespace], int]]:
    """A command defined as `add_<name>(sub)` in `midi_rae.<module>` (imported when the CLI starts)."""
    def add(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
        import importlib

        return getattr(importlib.import_module(f"midi_rae.{module}"), name)(sub)

    return add


# One entry per command: its module and the `add_<name>(sub)` there that returns its run function.
COMMANDS = {"prepare": _add_from("prepare", "add_prepare"), "train": _add_from("train", "add_train"),
            "train-decoder": _add_from("train", "add_train_decoder"), "run": _add_from("train", "add_run"),
            "encode": _add_from("encode", "add_encode"), "reconstruct": _add_from("reconstruct", "add_reconstruct"),
            "eval": _add_from("eval", "add_eval"), "probe": _add_from("probe", "add_probe"),
            "levels": _add_from("levels", "add_levels"), "finetune": _add_from("finetune", "add_finetune")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="midi-rae", description="Hierarchical representations of symbolic music.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runners = {name: add(sub) for name, add in COMMANDS.items()}
    args, extra = parser.parse_known_args(argv)
    # argparse fills a list positional once: KEY=VALUE overrides given after an option (`finetune RUN
    # --label x k=v`) come back unrecognised; they join the command's overrides, anything else is an error.
    if extra and (not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra)):
        parser.parse_args(argv)  # exits with argparse's own message
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return runners[args.command](args)
    # User and system errors (bad paths and files, a full disk, a config that cannot work: ConfigError
    # and BadInput are ValueErrors) get one line; anything else is a bug and keeps its traceback.
    except (OSError, ValueError) as e:
        print(f"midi-rae {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2
    finally:
        # Under torchrun: leave the process group before the interpreter exits; a gloo group left to
        # the exit's teardown now and then aborts its process ("terminate called without an active
        # exception"), failing a run that had finished.
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


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
