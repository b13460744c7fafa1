"""`midi-rae encode`: per-level embeddings of whole pieces, of any length, from a trained encoder.

The encoder sees a fixed window of `W = data.crop_width` time steps, so a piece is cut into
windows starting at `0, hop, 2*hop, ...` (the last one zero-padded past the piece end) and the
windows' tokens are stitched:

- `hop = W` (the default): non-overlapping tiles; every token comes from exactly one window.
- `hop < W`: overlapping windows; a token position held by several windows keeps the embedding
  of the window in which it is most central (ties: the earlier window), so tokens near a
  window edge, which saw the least context, are replaced. `hop` must be a multiple of the time
  downsample of every level with more than one column, so that the windows' grids coincide;
  a level of one column per window (the global token) keeps one token per window.

Positions are in input units, `(pitch row, time step)` of the token's first pixel:
`(row * downsample_h, window_start + col * downsample_w)`. Tokens that start at or after the
piece end are dropped. Each level is stored as `levels.<i>.emb` (N_i, D_i) float32,
`levels.<i>.pos` (N_i, 2) int64 and `levels.<i>.non_empty` (N_i,) bool, coarsest first; an
encoder with a time stage (`model.time_stage_dim`) adds its tokens, one per finest column, as
`time.emb`, `time.pos` (row 0) and `time.non_empty`. The safetensors metadata key `midi_rae`
holds a JSON object with the piece metadata, the level descriptions, window, hop, steps and the
checkpoint.

`--window-size` / `--crop-width` run the encoder at another attention window and input width
than it was trained at (e.g. trained on 128 x 64 crops with window 8, run on 128 x 256 with
window 16): the weights are loaded into an encoder of that geometry (`runs.load_encoder`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor, nn

from midi_rae.core import LevelInfo, PatchState
from midi_rae.dataset import read_inputs, windows
from midi_rae.roll import RollSettings
from midi_rae.runs import load_encoder, roll_settings
from midi_rae.utils import atomic_write, resolve_device

FORMAT = "midi-rae-embeddings/1"

# ----------------------------------------------------------------------------- embeddings


@dataclass
class LevelEmbedding:
    """One level over a whole piece."""

    emb: Tensor  # (N, D) float32
    pos: Tensor  # (N, 2) int64, (pitch row, time step) of each token's first pixel
    non_empty: Tensor  # (N,) bool, True where the token's receptive field holds a note
    info: LevelInfo


@dataclass
class Embeddings:
    """Every level of one piece, coarsest first, with the piece's metadata (and the time stage's
    tokens when the encoder has one)."""

    levels: list[LevelEmbedding]
    steps: int  # the piece's length in time steps
    window: int  # the encoder's window (time steps)
    hop: int
    meta: dict[str, Any]
    time: LevelEmbedding | None = None  # the time stage's tokens (`swin.TimeStage`), one per finest column

    def save(self, path: str | os.PathLike) -> Path:
        tensors: dict[str, Tensor] = {}
        for i, lvl in enumerate(self.levels):
            tensors[f"levels.{i}.emb"] = lvl.emb.float().contiguous()
            tensors[f"levels.{i}.pos"] = lvl.pos.long().contiguous()
            tensors[f"levels.{i}.non_empty"] = lvl.non_empty.bool().contiguous()
        info = [dataclasses.asdict(lvl.info) for lvl in self.levels]
        header = {"format": FORMAT, "steps": self.steps, "window": self.window, "hop": self.hop, "levels": info,
                  "piece": self.meta}
        if self.time is not None:
            tensors |= {"time.emb": self.time.emb.float().contiguous(), "time.pos": self.time.pos.long().contiguous(),
                        "time.non_empty": self.time.non_empty.bool().contiguous()}
            header["time"] = dataclasses.asdict(self.time.info)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Serialised in memory, written by Python: a failed write is an OSError naming the path.
        data = save(tensors, metadata={"midi_rae": json.dumps(header, default=str)})
        return atomic_write(path, lambda tmp: tmp.write_bytes(data))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Embeddings:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("midi_rae", "{}"))
            if header.get("format") != FORMAT:
                raise ValueError(f"{path} is not an embeddings file written by `midi-rae encode`")

            def level(prefix: str, d: dict[str, Any]) -> LevelEmbedding:
                info = LevelInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
                return LevelEmbedding(f.get_tensor(f"{prefix}.emb"), f.get_tensor(f"{prefix}.pos"),
                                      f.get_tensor(f"{prefix}.non_empty"), info)

            levels = [level(f"levels.{i}", d) for i, d in enumerate(header["levels"])]
            time = level("time", header["time"]) if "time" in header else None
        return cls(levels, header["steps"], header["window"], header["hop"], header["piece"], time)


def check_hop(encoder: nn.Module, hop: int) -> None:
    """`hop` must lie in 1..W and keep every multi-column level's grid aligned across windows."""
    W = encoder.img_size[1]
    strides = sorted({info.downsample[1] for info in encoder.feature_info if info.grid_size[1] > 1})
    if not 0 < hop <= W or any(hop % s for s in strides):
        step = int(np.lcm.reduce(strides)) if strides else 1
        raise ValueError(f"hop must be a multiple of {step} (the time downsample of the coarsest multi-column level) "
                         f"between {step} and the window {W}; got {hop}")


def stitch(emb: Tensor, non_empty: Tensor, pos: Tensor, info: LevelInfo, starts: Tensor, width: int,
           steps: int) -> LevelEmbedding:
    """The tokens of K windows (emb (K, N, D), non_empty (K, N), grid pos (N, 2)) as one
    piece-level set: each (row, time) position from the window where it is most central."""
    K, N, D = emb.shape
    dh, dw = info.downsample
    row = (pos[:, 0] * dh).expand(K, N)  # (K, N)
    time = starts[:, None] + pos[:, 1] * dw  # (K, N)
    off_centre = (pos[:, 1] * dw + dw / 2 - width / 2).abs().expand(K, N)  # the same for every window
    keep = (time < steps).flatten()
    row, time, off_centre = row.flatten()[keep], time.flatten()[keep], off_centre.flatten()[keep]
    key = row * (int(starts[-1]) + width) + time  # unique per (row, time)
    # Sort by centrality, then (stably) by position: the first entry of each position wins.
    order = torch.argsort(off_centre, stable=True)
    order = order[torch.argsort(key[order], stable=True)]
    first = torch.ones_like(order, dtype=torch.bool)
    first[1:] = key[order][1:] != key[order][:-1]
    idx = order[first]  # one entry per position, ordered by (row, time)
    return LevelEmbedding(emb.reshape(K * N, D)[keep][idx], torch.stack([row[idx], time[idx]], dim=1),
                          non_empty.flatten()[keep][idx], info)


@torch.no_grad()
def encode_roll(encoder: nn.Module, roll: Tensor | np.ndarray, hop: int | None = None, batch_size: int = 16,
                meta: dict[str, Any] | None = None) -> Embeddings:
    """Embeddings of a whole roll: (C, 128, T) or (128, T), float in [0, 1] (uint8 0/1 accepted)."""
    x = torch.as_tensor(np.asarray(roll) if isinstance(roll, np.ndarray) else roll).float()
    if x.dim() == 2:
        x = x[None]
    C = encoder.in_chans
    if x.dim() != 3 or x.shape[1] != encoder.img_size[0] or x.shape[0] < C:
        raise ValueError(f"expected a ({C}, {encoder.img_size[0]}, T) roll, got {tuple(x.shape)}")
    x = x[:C]
    W = encoder.img_size[1]
    hop = W if hop is None else hop
    check_hop(encoder, hop)
    device = next(encoder.parameters()).device
    wins, starts = windows(x, W, hop)  # (K, C, H, W)
    was_training = encoder.training  # a module handed over mid-training: drop path would make embeddings random
    encoder.eval()
    try:
        outs = [encoder(wins[i:i + batch_size].to(device)) for i in range(0, len(wins), batch_size)]
    finally:
        encoder.train(was_training)

    def stitched(states: list[PatchState], info: LevelInfo) -> LevelEmbedding:
        emb = torch.cat([st.emb for st in states]).float().cpu()  # (K, N, D)
        ne = torch.cat([st.non_empty for st in states]).cpu()  # (K, N)
        return stitch(emb, ne, states[0].pos.cpu(), info, starts, W, x.shape[-1])

    levels = [stitched([o.patches[li] for o in outs], info) for li, info in enumerate(encoder.feature_info)]
    time = None
    if outs[0].time is not None:  # one token per finest column, spanning every pitch
        cols, dim = outs[0].time.num_patches, outs[0].time.dim
        info = LevelInfo((1, cols), dim, (1, cols), (encoder.img_size[0], W // cols), "time_stage")
        time = stitched([o.time for o in outs], info)
    return Embeddings(levels, x.shape[-1], W, hop, dict(meta or {}), time)


def encode(source: str | os.PathLike | Tensor | np.ndarray, checkpoint: str | os.PathLike | nn.Module,
           hop: int | None = None, cache_dir: str | os.PathLike | None = None, window_size: int | None = None,
           crop_width: int | None = None) -> list[Embeddings]:
    """Python API: embeddings of a roll (one entry) or of every piece of a file / cache id
    pattern. `checkpoint` is a run folder, a weights file or an encoder module; `window_size` /
    `crop_width` load a checkpoint at another geometry (`runs.load_encoder`). Music files are
    read at the run's time grid (`data.steps_per_beat`); a bare module reads them at the default."""
    if isinstance(checkpoint, nn.Module):
        if window_size is not None or crop_width is not None:
            raise ValueError("window_size / crop_width move a checkpoint's weights to another geometry; give the "
                             "checkpoint path, not a built encoder")
        encoder, settings = checkpoint, RollSettings()
    else:
        encoder, cfg = load_encoder(checkpoint, window_size=window_size, crop_width=crop_width)
        settings = roll_settings(cfg)
    if isinstance(source, (Tensor, np.ndarray)):
        return [encode_roll(encoder, source, hop)]
    return [encode_roll(encoder, p.roll, hop, meta=p.meta) for p in read_inputs([str(source)], cache_dir, settings)]


# ----------------------------------------------------------------------------- command line


def unique_names(pieces: list[Any]) -> list[str]:
    """Output names: each piece's name, with its source's folders in front where two pieces of
    different folders share one (a/x.mid, b/x.mid -> a_x, b_x), and a number where that is not
    enough: no output overwrites another's."""
    names = [pc.name for pc in pieces]
    for depth in range(1, 4):
        seen = Counter(names)
        if all(v == 1 for v in seen.values()):
            return names
        for i, pc in enumerate(pieces):
            if seen[names[i]] > 1 and pc.meta.get("source"):
                folders = Path(str(pc.meta["source"])).parent.parts[-depth:]
                names[i] = "_".join([*folders, pc.name])
    taken: set[str] = set()
    unique = []
    for n in names:
        k, name = 1, n
        while name in taken:
            k += 1
            name = f"{n}-{k}"
        taken.add(name)
        unique.append(name)
    return unique


def add_encode(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser("encode", help="per-level embeddings of whole pieces (safetensors)",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="run folder (runs/<name>) or encoder / checkpoint .safetensors")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="music files (MIDI, MusicXML, ABC, ...) or, with --cache-dir, piece ids / patterns ('music21/bach/*')")
    p.add_argument("-o", "--out", required=True, metavar="OUT",
                   help="output folder (one <piece>.safetensors per piece), or a .safetensors file for a single piece")
    p.add_argument("--hop", type=int, help="window hop in time steps (default: the window width, i.e. non-overlapping tiles)")
    p.add_argument("--cache-dir", help="a prepared roll cache to take piece ids from")
    p.add_argument("--window-size", type=int, metavar="N",
                   help="Swin attention window to run at (default: the one it was trained with)")
    p.add_argument("--crop-width", type=int, metavar="W",
                   help="encoder input width in time steps (default: the trained crop width)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")

    def run(args: argparse.Namespace) -> int:
        out = Path(args.out)
        single = out.suffix == ".safetensors"
        # Any other suffix names a file too (out/h.txt), which would become a folder; a folder already there is fine.
        if out.suffix and not single and not out.is_dir():
            raise ValueError(f"-o {out}: encode writes .safetensors files: give {out.with_suffix('.safetensors')} "
                             f"for one piece, or a folder (a name without a suffix, or one that exists) for one "
                             f"file per piece")
        encoder, cfg = load_encoder(args.checkpoint, resolve_device(args.device), args.window_size, args.crop_width)
        (out.parent if single else out).mkdir(parents=True, exist_ok=True)  # a bad OUT fails before any work
        if args.hop is not None:  # before reading the inputs (encode_roll checks it too)
            check_hop(encoder, args.hop)
        # One input that cannot be read is one error line; among several, it is skipped and reported.
        pieces, skipped = [], []
        for item in args.inputs:
            try:
                pieces += read_inputs([item], args.cache_dir, roll_settings(cfg))
            except (OSError, ValueError) as e:
                if len(args.inputs) == 1:
                    raise
                skipped.append(item)
                print(f"SKIP {item}: {e}", file=sys.stderr)
        if single and len(pieces) != 1:
            raise ValueError(f"{len(pieces)} pieces to encode but OUT is one file; give a folder")
        for pc, name in zip(pieces, unique_names(pieces)):
            e = encode_roll(encoder, pc.roll, args.hop, meta={**pc.meta, "checkpoint": str(args.checkpoint)})
            path = e.save(out if single else out / f"{name}.safetensors")
            shapes = ", ".join(f"{lvl.info.name or i}: {tuple(lvl.emb.shape)}" for i, lvl in enumerate(e.levels))
            print(f"{path}: {e.steps} steps, hop {e.hop}; {shapes}")
        if skipped:
            print(f"midi-rae encode: {len(skipped)} of {len(args.inputs)} inputs skipped (above); "
                  f"{len(pieces)} pieces encoded", file=sys.stderr)
            return 1
        return 0

    return run
