"""Labels of the cache metadata as classification tasks, shared by the probe suite (`probes`) and
fine-tuning (`stages.finetune`): the label of a piece (`label_of`), the classes a task keeps and
its training and test pieces, split grouped by work by a hash of the piece's work (`find_tasks`,
`grouped_split`), and fixed crops of those pieces (`piece_crops`), the same every run.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from midi_rae.cache import load_roll, load_settings, piece_work, split_of
from midi_rae.roll import PITCHES

TASKS = ("collection", "composer", "time_signature", "mode", "source_set")


def label_of(piece: dict[str, Any], task: str) -> str | None:
    """The value of `task` for one piece of the index: a metadata key; `mode` from a key name that
    states it ('G major'; an ABC key field names only the signature); `source_set`, the source
    file's name without its trailing number (the Essen collection's files are regions and sources,
    e.g. han = Chinese Han songs, erk = Erk's German songs), named with its collection:
    'essenFolksong/han'."""
    if task == "mode":
        key = piece.get("key") or ""
        return next((m for m in ("major", "minor") if key.endswith(m)), None)
    if task == "time_signature":  # kern's and MusicXML's symbols for common and cut time
        value = {"C": "4/4", "C|": "2/2"}.get(piece.get(task) or "", piece.get(task))
        return str(value) if value else None
    if task == "source_set":  # within a collection: `find_tasks` keeps one collection's sets
        stem = re.sub(r"\d+$", "", Path(piece.get("source") or "").stem)
        return f"{piece.get('collection')}/{stem}" if stem else None
    value = piece.get(task)
    return None if value in (None, "") else str(value)


def pick_pieces(members: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The same n pieces every run, by a salted hash of the piece id. The salt matters: the
    train/test split hashes the work key (`cache.split_of`), and picking the n smallest of that
    same hash would put nearly every picked piece on one side."""
    return sorted(members, key=lambda p: hashlib.sha1(f"probe-pick:{p['piece_id']}".encode()).digest())[:n]


@dataclass
class Task:
    """One label to predict: its classes and the pieces of each side of the split."""

    name: str
    classes: list[str]
    train: list[dict[str, Any]]
    test: list[dict[str, Any]]


def find_tasks(index: list[dict[str, Any]], test_fraction: float, tasks: list[str] | None = None,
               classes: list[str] | None = None, min_train_pieces: int = 20, min_test_pieces: int = 4,
               max_classes: int = 8, max_pieces_per_class: int = 150) -> list[Task]:
    """The tasks the metadata supports: classes with at least `min_train_pieces` training and
    `min_test_pieces` test works (the `max_classes` most frequent), tasks with at least two; the
    source sets of one collection (the one with the most such sets)."""
    found = []
    for name in tasks or TASKS:
        sides: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for p in index:
            value = label_of(p, name)
            if value is not None and (classes is None or value in classes):
                side = "test" if split_of(piece_work(p), test_fraction) == "val" else "train"
                sides.setdefault(value, {"train": [], "test": []})[side].append(p)
        # works, not files: one movement stored as .krn and .mxl, or a mass's sections, are one work
        works = lambda side: len({piece_work(p) for p in side})  # noqa: E731
        ok = [v for v, s in sides.items() if works(s["train"]) >= min_train_pieces and works(s["test"]) >= min_test_pieces]
        if name == "source_set":  # one collection's sets: a set that is a whole collection (all of
            # airdsAirs is 'book') would make the task part collection
            per_collection: dict[str, list[str]] = {}
            for v in ok:
                per_collection.setdefault(v.split("/", 1)[0], []).append(v)
            ok = max(sorted(per_collection.values()), key=len, default=[])
        ok = sorted(sorted(ok), key=lambda v: -len(sides[v]["train"]))[:max_classes]
        if len(ok) >= 2:
            names = sorted(ok)
            found.append(Task(name, names,
                              [p for v in names for p in pick_pieces(sides[v]["train"], max_pieces_per_class)],
                              [p for v in names for p in pick_pieces(sides[v]["test"], max(max_pieces_per_class // 4, 1))]))
    return found


@dataclass
class Crops:
    """Crops of a set of pieces, rendered once and shared by every task."""

    x: Tensor  # (N, C, 128, W) float in [0, 1], every channel of the cache
    pieces: list[str]  # piece id of each crop: the groups of the split
    by_piece: dict[str, list[int]]  # piece id -> crop rows

    def rows(self, pieces: list[dict[str, Any]]) -> list[int]:
        """The crop rows of these pieces (index entries), in their order; a piece without crops adds none."""
        return [i for p in pieces for i in self.by_piece.get(p["piece_id"], [])]


def piece_crops(cache_dir: str | os.PathLike, pieces: list[dict[str, Any]], width: int,
                crops_per_piece: int = 4) -> Crops:
    """Non-overlapping windows from each piece's start, skipping (nearly) silent ones."""
    settings = load_settings(cache_dir)
    xs, ids, by_piece = [], [], {}
    for p in pieces:
        if p["piece_id"] in by_piece:
            continue
        roll = load_roll(cache_dir, p)
        rows = by_piece.setdefault(p["piece_id"], [])
        for start in range(0, max(roll.shape[-1], 1), width):
            if len(rows) == crops_per_piece:
                break
            window = np.zeros((roll.shape[0], PITCHES, width), dtype=np.float32)
            part = roll[:, :, start:start + width]
            window[:, :, : part.shape[-1]] = part
            if (window[0] > 0).any(axis=0).sum() < width // 8:  # (nearly) silent: nothing to classify
                continue
            rows.append(len(xs))
            xs.append(torch.from_numpy(window / settings.scale))
            ids.append(p["piece_id"])
    if not xs:
        raise ValueError(f"no crop of {width} steps with notes in {cache_dir}; prepare more or longer pieces")
    return Crops(torch.stack(xs), ids, by_piece)


def grouped_split(groups: list[str], test_fraction: float, salt: str = "") -> Tensor:
    """(N,) bool, True for items on the test side; decided per group (a work: `cache.piece_work`),
    salted for an inner split."""
    return torch.tensor([split_of(salt + g, test_fraction) == "val" for g in groups], dtype=torch.bool)
