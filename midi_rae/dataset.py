"""What the models read: random crops of a prepared cache's pieces for training and validation
(`PianoRollDataset`), and whole pieces (files or cache ids) cut into model-width windows for
inference (`read_inputs`, `windows`).
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from midi_rae.cache import CacheReader, CachedPiece, load_index, load_roll, load_settings
from midi_rae.roll import RollSettings, read_pieces


def _stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha1(repr(parts).encode()).digest()[:8], "big")


class PianoRollDataset(Dataset):
    """Random `(C, 128, crop_width)` crops of the pieces of one split of a prepared cache.

    Items are dicts of tensors: `x` (C, 128, W) float in [0, 1]; with `pair=True` also `x2`, a
    second view of the same passage (`view_mode='piece'`: of another passage of the same piece,
    from its own anchor), and `shift1`, `shift2`: each view's (time, pitch) offset
    from the shared anchor crop, as a long tensor `[dt, dp]`. View k shows the anchor's music
    moved up by dp semitones, starting dt steps later in the piece (zero fill, no wrap).
    Also `piece` (index of the piece in this split: `piece_id(piece)`), `start` (anchor's first column), `steps` (the
    piece's length: columns of `x` at or past `steps - start` are padding) and `piece_id`.

    Each piece contributes `ceil(T / crop_width)` items per epoch, so long pieces are not
    under-sampled. Training crops are drawn from `(seed, epoch, index)`: reproducible, with
    any number of loader workers; call `set_epoch` to get new crops. The validation split is
    a fixed set of crops and shifts (no augmentation), identical on every run.
    Near-empty crops (fewer than `min_active` columns with a sounding note) are redrawn.
    `crop_starts='tiles'` starts every anchor crop at a multiple of `crop_width` from the piece
    start (the windows `encode` and the probe suite read) instead of at any step.
    `pieces`: these records of the cache's index instead of a split of it (`split` then only says
    whether crops are augmented); `labels`: piece id -> class index, given to each item as `y`.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        split: str = "train",
        crop_width: int = 128,
        pair: bool = True,
        max_time_shift: int = 16,
        max_pitch_shift: int = 6,
        transpose: int = 0,
        val_fraction: float = 0.05,
        min_active: int | None = None,
        channels: int | None = None,
        seed: int = 0,
        view_mode: str = "shift",
        crop_starts: str = "any",
        pieces: list[dict[str, Any]] | None = None,
        labels: dict[str, int] | None = None,
    ) -> None:
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        self.cache_dir = Path(cache_dir)
        self.cache = CacheReader(cache_dir)
        self.settings = self.cache.settings
        self.split, self.crop_width, self.pair = split, crop_width, pair
        self.max_time_shift, self.max_pitch_shift = max_time_shift, max_pitch_shift
        self.transpose = transpose if split != "val" else 0  # the validation set is never augmented
        self.min_active = crop_width // 8 if min_active is None else min_active
        self.channels = channels or self.settings.channels
        if self.channels > self.settings.channels:
            raise ValueError(f"channels={channels}, but the cache holds {self.settings.channels} (prepare with onsets)")
        if view_mode not in ("shift", "piece"):
            raise ValueError(f"view_mode must be 'shift' or 'piece', got {view_mode!r}")
        self.view_mode = view_mode
        if crop_starts not in ("any", "tiles"):
            raise ValueError(f"crop_starts must be 'any' or 'tiles', got {crop_starts!r}")
        self.crop_starts = crop_starts
        self.seed, self.epoch = seed, 0
        self.scale = self.settings.scale
        if pieces is not None:  # these records of the index, in their order
            row_of = {self.cache.piece_id(r): r for r in range(len(self.cache.index))}
            self.rows = np.array([row_of[p["piece_id"]] for p in pieces], dtype=np.int64)  # (P,)
        else:
            # Numpy columns, not a list of dicts: start-up and every worker's memory stay small for any corpus size.
            in_val = self.cache.index["split"] < val_fraction  # what split_of(its work, val_fraction) says, for all pieces at once
            self.rows = np.flatnonzero(in_val if split == "val" else ~in_val if split == "train" else np.ones_like(in_val))  # (P,)
        if not len(self.rows):
            raise ValueError(f"no pieces in split {split!r} of {cache_dir}")
        steps = self.cache.index["steps"][self.rows].astype(np.int64)
        self._item_end = np.cumsum(np.maximum(1, -(-steps // crop_width)))  # item i belongs to piece searchsorted(_item_end, i, 'right')
        # (P,) the class of each piece, or None
        self.labels = None if labels is None else np.array([labels[self.piece_id(i)] for i in range(len(self.rows))])

    @property
    def num_pieces(self) -> int:
        return len(self.rows)

    def items_per_piece(self) -> np.ndarray:
        """(P,) how many items (crops per epoch) each piece gives: its length in crop widths."""
        return np.diff(self._item_end, prepend=0)

    def piece_id(self, i: int) -> str:
        """The id of piece `i` of this split (an item's `piece`)."""
        return self.cache.piece_id(int(self.rows[i]))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self._item_end[-1])

    def _rng(self, index: int) -> np.random.Generator:
        # The validation set never changes: its crops depend on the item only.
        epoch = self.epoch if self.split != "val" else -1
        return np.random.default_rng(_stable_seed(self.seed, epoch, index))

    def _anchor(self, sounding: np.ndarray, rng: np.random.Generator) -> int:
        """A crop start whose window has at least `min_active` sounding columns, if one is found.
        sounding: (T,) bool, the piece's columns with a note."""
        t = len(sounding)
        best, best_count = 0, -1
        for _ in range(10):
            if self.crop_starts == "tiles":  # a tile that begins inside the piece, as `encode` and the probes cut them
                start = self.crop_width * int(rng.integers(0, max(t - 1, 0) // self.crop_width + 1))
            else:
                start = int(rng.integers(0, max(t - self.crop_width, 0) + 1))
            count = int(sounding[start:start + self.crop_width].sum())
            if count >= self.min_active:
                return start
            if count > best_count:
                best, best_count = start, count
        return best

    def _view(self, piece: CachedPiece, start: int, dt: int, dp: int) -> torch.Tensor:
        x = piece.window(start + dt, self.crop_width, dp, self.channels)
        return torch.from_numpy(x).float().div_(self.scale)  # (C, 128, W)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = int(np.searchsorted(self._item_end, index, side="right"))
        piece = self.cache.piece(int(self.rows[i]))
        sounding = piece.sounding()
        rng = self._rng(index)
        start = self._anchor(sounding, rng)
        base = int(rng.integers(-self.transpose, self.transpose + 1)) if self.transpose else 0
        item: dict[str, Any] = {"piece": i, "piece_id": self.piece_id(i), "start": start, "steps": piece.steps}
        if self.labels is not None:
            item["y"] = int(self.labels[i])
        if not self.pair:
            item["x"] = self._view(piece, start, 0, base)
            return item
        t, p = self.max_time_shift, self.max_pitch_shift
        shifts = [(int(rng.integers(-t, t + 1)), int(rng.integers(-p, p + 1))) for _ in range(2)]
        item["x"] = self._view(piece, start, shifts[0][0], base + shifts[0][1])
        # 'piece': view 2 is another passage of the same piece (its own anchor), in its own key.
        start2 = self._anchor(sounding, rng) if self.view_mode == "piece" else start
        item["x2"] = self._view(piece, start2, shifts[1][0], base + shifts[1][1])
        item["shift1"] = torch.tensor(shifts[0])
        item["shift2"] = torch.tensor(shifts[1])
        return item


# ----------------------------------------------------------------------------- whole pieces, for inference


@dataclass
class PieceRoll:
    name: str  # file stem for outputs
    roll: np.ndarray  # (C, 128, T) float32 in [0, 1]
    meta: dict[str, Any]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "piece"


def read_inputs(inputs: list[str], cache_dir: str | os.PathLike | None = None,
                settings: RollSettings = RollSettings()) -> list[PieceRoll]:
    """Pieces from files (every format `prepare` reads; a multi-piece file gives several) and,
    with `cache_dir`, from a prepared cache by piece id or shell pattern (`music21/bach/*`).
    Files are read with `settings`; a cache on another time grid than `settings` is refused."""
    index = load_index(cache_dir) if cache_dir else None
    pieces: list[PieceRoll] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found, _ = read_pieces(path, settings)
            for pc in found:
                name = path.stem if len(found) == 1 else f"{path.stem}-{pc.index}"
                meta = {"source": str(path), "index": pc.index, "steps_per_beat": settings.steps_per_beat, **pc.meta}
                pieces.append(PieceRoll(name, pc.roll.astype(np.float32) / settings.scale, meta))
            continue
        if index is None:
            raise FileNotFoundError(f"{item} is not a file (to encode pieces of a prepared cache by id, pass --cache-dir)")
        matches = [p for p in index if p["piece_id"] == item or fnmatch.fnmatchcase(p["piece_id"], item)]
        if not matches:
            raise FileNotFoundError(f"no piece id matches {item!r} in {cache_dir}")
        cache_settings = load_settings(cache_dir)
        if cache_settings.steps_per_beat != settings.steps_per_beat:
            raise ValueError(f"the cache {cache_dir} was prepared at {cache_settings.steps_per_beat} steps per beat, the "
                             f"encoder reads {settings.steps_per_beat} (its run's data.steps_per_beat); give a cache "
                             f"prepared with --steps-per-beat {settings.steps_per_beat}")
        for p in matches:
            roll = load_roll(cache_dir, p, mmap=False).astype(np.float32) / cache_settings.scale
            pieces.append(PieceRoll(_safe_name(p["piece_id"]), roll,
                                    {**p, "steps_per_beat": cache_settings.steps_per_beat}))
    return pieces


def windows(roll: Tensor, width: int, hop: int) -> tuple[Tensor, Tensor]:
    """(C, H, T) -> windows (K, C, H, width) starting at 0, hop, ..., zero-padded past T, and
    their starts (K,) long. K is the fewest windows that reach the piece end."""
    T = roll.shape[-1]
    K = max(1, -(-(T - width) // hop) + 1)
    padded = F.pad(roll, (0, (K - 1) * hop + width - T))
    starts = torch.arange(K) * hop
    return padded.unfold(-1, width, hop).permute(2, 0, 1, 3).contiguous(), starts  # (K, C, H, width)
