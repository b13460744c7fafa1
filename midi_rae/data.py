"""Symbolic music <-> piano roll, the roll cache reader, the datasets that feed training, and
whole pieces (files or cache ids) cut into model-width windows for inference.

A roll is a `(C, 128, T)` uint8 array: row index = MIDI pitch, one column per time step at
`steps_per_beat` steps per quarter note. Channel 0 is the frame (note sounding), the optional
channel 1 marks onsets, so that a repeated note stays two notes. With `velocity=True` the
channels hold MIDI velocities (1..127) instead of 1.

Readers: MIDI (.mid .midi .kar) and ABC go through symusic (C++, fast; ABC via its bundled
abc2midi, which also expands repeats); MusicXML, kern and everything else music21 reads go
through music21 and are converted to a symusic `Score`, so that one function makes every roll.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import symusic
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

MIDI_SUFFIXES = (".mid", ".midi", ".kar")
ABC_SUFFIXES = (".abc",)
# music21 formats we read; .rntxt (roman-numeral analyses) are harmony sketches, not music.
MUSIC21_SUFFIXES = (".mxl", ".xml", ".musicxml", ".krn", ".mei", ".md", ".nwc", ".nwctxt")
SUFFIXES = MIDI_SUFFIXES + ABC_SUFFIXES + MUSIC21_SUFFIXES

# A roll longer than this (about 7 hours at 120 bpm, 4 steps per beat) is a hostile or broken
# file (e.g. one note at tick 2**31); refusing it keeps one file from exhausting memory.
MAX_STEPS = 200_000
# Ticks per quarter for scores we build ourselves (music21 input, rolls written back):
# divisible by 2, 3, 4, 5, 6, 8, so triplets and quintuplets land on ticks exactly.
TPQ = 480

_MAJOR = ["Cb", "Gb", "Db", "Ab", "Eb", "Bb", "F", "C", "G", "D", "A", "E", "B", "F#", "C#"]
_MINOR = ["ab", "eb", "bb", "f", "c", "g", "d", "a", "e", "b", "f#", "c#", "g#", "d#", "a#"]


class BadInput(ValueError):
    """An input that cannot become a piano roll; the message is the reason shown in reports."""


@dataclass(frozen=True)
class RollSettings:
    """How sources become rolls. Part of every cache key: changed settings never reuse rolls."""

    steps_per_beat: int = 4
    onset: bool = True
    velocity: bool = False
    drums: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.steps_per_beat <= 96:
            raise ValueError(f"steps_per_beat must be in 1..96, got {self.steps_per_beat}")

    @property
    def channels(self) -> int:
        return 2 if self.onset else 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class Piece:
    """One piece read from a source file: its roll and its metadata."""

    index: int  # position within the source file (tunes of an ABC book, scores of an opus)
    roll: np.ndarray  # (C, 128, T) uint8
    meta: dict[str, Any]


# ----------------------------------------------------------------------------- MIDI <-> roll


def _key_name(sharps: int, minor: bool | None) -> str:
    """'G major' / 'e minor'; a signature without a mode is named by its accidentals ('2 flats')."""
    if minor is not None:
        return f"{_MINOR[sharps + 7]} minor" if minor else f"{_MAJOR[sharps + 7]} major"
    if sharps == 0:
        return "no sharps or flats"
    word = "sharp" if sharps > 0 else "flat"
    return f"{abs(sharps)} {word}" + ("s" if abs(sharps) > 1 else "")


def score_to_roll(score: symusic.Score, settings: RollSettings = RollSettings()) -> np.ndarray:
    """Merge all (non-drum) tracks of a symusic score into a `(C, 128, T)` uint8 roll.

    The tracks' notes are merged into one track before rendering, so memory follows the roll's
    size, not tracks x steps (a small file with 1000 tracks would otherwise ask for tens of GB).
    Where notes of one pitch overlap, the pixel holds the highest velocity."""
    tracks = [t for t in score.tracks if settings.drums or not t.is_drum]
    if not any(t.note_num() for t in tracks):
        has_drums = any(t.is_drum and t.note_num() for t in score.tracks)
        raise BadInput("drum tracks only (no pitched notes)" if has_drums else "no notes")
    merged = symusic.Score(score.ticks_per_quarter)
    for t in tracks:
        merged.tracks.append(t)
    # min_dur=1: a note shorter than a step still sounds for one step instead of vanishing.
    merged = merged.resample(tpq=settings.steps_per_beat, min_dur=1)
    parts = [t.notes.numpy() for t in merged.tracks]
    notes = {k: np.concatenate([n[k] for n in parts]) for k in ("time", "duration", "pitch", "velocity")}
    steps = int((notes["time"] + notes["duration"]).max())
    if steps > MAX_STEPS:
        raise BadInput(f"too long: {steps} steps at {settings.steps_per_beat} per beat (limit {MAX_STEPS})")
    # A later note overwrites an earlier one where they overlap: ascending velocity makes that the maximum.
    order = np.argsort(notes["velocity"], kind="stable")
    one = symusic.Track("merged", 0, False)
    one.notes = symusic.Note.from_numpy(*(notes[k][order] for k in ("time", "duration", "pitch", "velocity")))
    modes = ["frame", "onset"] if settings.onset else ["frame"]
    pr = one.pianoroll(modes=modes, pitch_range=(0, 128), encode_velocity=settings.velocity)  # (C, 128, T')
    roll = np.zeros((len(modes), 128, steps), dtype=np.uint8)
    t = min(steps, pr.shape[-1])
    roll[..., :t] = pr[..., :t]
    return roll


def midi_to_roll(source: str | os.PathLike | bytes, settings: RollSettings = RollSettings()) -> np.ndarray:
    """Read a MIDI file (path or bytes) into a `(C, 128, T)` uint8 roll."""
    return score_to_roll(_read_midi(source), settings)


def _read_midi(source: str | os.PathLike | bytes) -> symusic.Score:
    try:
        if isinstance(source, bytes):
            return symusic.Score.from_midi(source)
        return symusic.Score(str(source))
    except RuntimeError as e:  # symusic reports every malformed-file case as RuntimeError
        raise BadInput(f"not a readable MIDI file ({str(e).removesuffix(': iostream error')})") from None


def roll_to_score(roll: np.ndarray, steps_per_beat: int = 4, velocity: int = 80) -> symusic.Score:
    """Turn a `(C, 128, T)` roll back into a one-track symusic score.

    A note starts where the frame switches on or where the onset channel (if present) marks a
    new note while the frame stays on, so repeated notes stay separate. A roll holding
    velocities (values > 1) keeps them; a binary roll gets `velocity`.
    """
    frame = roll[0]  # (128, T)
    onset = roll[1] > 0 if roll.shape[0] > 1 else np.zeros(frame.shape, dtype=bool)
    on = frame > 0
    binary = frame.max(initial=0) <= 1
    ticks = TPQ // steps_per_beat if TPQ % steps_per_beat == 0 else 1
    score = symusic.Score(steps_per_beat * ticks)
    track = symusic.Track("roll", 0, False)
    prev = np.zeros_like(on)
    prev[:, 1:] = on[:, :-1]
    starts = on & (~prev | onset)  # (128, T)
    for pitch in np.flatnonzero(starts.any(axis=1)):
        s = np.flatnonzero(starts[pitch])
        # A note ends at the next note start or where the frame switches off, whichever comes first.
        offs = np.flatnonzero(on[pitch] & ~np.append(on[pitch, 1:], False)) + 1
        nxt = np.append(s[1:], on.shape[1])
        ends = np.minimum(nxt, offs[np.searchsorted(offs, s, side="right")])
        for a, b in zip(s.tolist(), ends.tolist()):
            vel = velocity if binary else int(frame[pitch, a])
            track.notes.append(symusic.Note(a * ticks, (b - a) * ticks, int(pitch), vel))
    track.notes.sort()
    score.tracks.append(track)
    return score


def roll_to_midi(roll: np.ndarray, path: str | os.PathLike, steps_per_beat: int = 4, velocity: int = 80) -> None:
    """Write a `(C, 128, T)` roll to a MIDI file (see `roll_to_score`)."""
    roll_to_score(roll, steps_per_beat, velocity).dump_midi(str(path))


# ----------------------------------------------------------------------------- ABC and music21


@contextmanager
def _captured_stdout() -> Iterator[list[str]]:
    """Collect what C code prints on fd 1 (symusic's abc2midi prints its diagnostics there)."""
    lines: list[str] = []
    saved = os.dup(1)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            yield lines
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode("utf-8", "replace").splitlines())


def split_abc(text: str) -> list[str]:
    """Split an ABC file into tunes (each starts at an `X:` line); the file header is prepended to each."""
    parts = re.split(r"(?m)^(?=X:)", text)
    header, tunes = parts[0], parts[1:]
    header = "\n".join(l for l in header.splitlines() if re.match(r"^([A-Za-z]:|%%)", l))
    return [f"{header}\n{t}" if header else t for t in tunes]


def _abc_fields(tune: str) -> dict[str, str]:
    """The first value of each header field of a tune (T: title, M: meter, K: key, N: notes)."""
    fields: dict[str, str] = {}
    for m in re.finditer(r"(?m)^([A-Za-z]):\s*(.*?)\s*$", tune):
        fields.setdefault(m.group(1), m.group(2))
        if m.group(1) == "K":  # the body starts after K:
            break
    return fields


_REPEAT_ERROR = re.compile(r"^Error.*(repeat|variant|\|:|:\||::)", re.IGNORECASE)


def abc_tune_to_score(tune: str) -> symusic.Score:
    """Parse one ABC tune with symusic (music21 where abc2midi fails); badly formed repeats
    are rejected rather than guessed at."""
    with _captured_stdout() as log:
        try:
            score = symusic.Score.from_abc(tune)
        except RuntimeError as e:
            error = str(e)
        else:
            error = None
    bad = [l for l in log if _REPEAT_ERROR.search(l)]
    if bad:
        raise BadInput(f"badly formed repeats (abc2midi: {bad[0].split(' : ', 1)[-1].strip()})")
    if error is None:
        return score
    # abc2midi gave up (its error names a temp file; the message below stays deterministic).
    from music21 import converter

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return music21_to_score(converter.parse(tune, format="abc"))
    except Exception as e:
        raise BadInput(f"unreadable ABC tune (abc2midi failed; music21: {type(e).__name__}: {str(e)[:120]})") from None


def music21_to_score(stream: Any) -> symusic.Score:
    """Convert a music21 score to a symusic score: one track per part, tied notes merged.

    Chord symbols (harmony annotations) and grace notes (zero duration) are not sounding
    notes of the score and are left out; repeats are played as written (not expanded).
    """
    from music21 import chord, harmony, note

    score = symusic.Score(TPQ)
    for part in getattr(stream, "parts", None) or [stream]:
        track = symusic.Track(str(getattr(part, "partName", "") or ""), 0, False)
        notes: list[list[int]] = []  # [start, duration, pitch, velocity]
        open_ties: dict[int, int] = {}  # pitch -> index in notes of the note a tie continues
        for el in part.flatten().notes:
            if not isinstance(el, (note.Note, chord.Chord)) or isinstance(el, harmony.Harmony):
                continue
            dur = round(float(el.duration.quarterLength) * TPQ)
            if dur <= 0:
                continue
            start = round(float(el.offset) * TPQ)
            vel = (el.volume.velocity if el.hasVolumeInformation() else None) or 80
            members = [el] if isinstance(el, note.Note) else list(el.notes)
            for n in members:
                pitch = n.pitch.midi
                tie_obj = n.tie or el.tie
                tie = tie_obj.type if tie_obj is not None else None
                i = open_ties.get(pitch)
                if tie in ("continue", "stop") and i is not None and sum(notes[i][:2]) == start:
                    notes[i][1] += dur
                else:
                    notes.append([start, dur, pitch, vel])
                    i = len(notes) - 1
                if tie in ("start", "continue"):
                    open_ties[pitch] = i
                else:
                    open_ties.pop(pitch, None)
        for start, dur, pitch, vel in notes:
            if 0 <= pitch < 128:
                track.notes.append(symusic.Note(start, dur, pitch, int(vel)))
        track.notes.sort()
        score.tracks.append(track)
    return score


def _music21_meta(stream: Any) -> dict[str, Any]:
    from music21 import key, meter

    md = stream.metadata
    ts = next(iter(stream.recurse().getElementsByClass(meter.TimeSignature)), None)
    ks = next(iter(stream.recurse().getElementsByClass(key.KeySignature)), None)
    if isinstance(ks, key.Key):
        key_name = f"{ks.tonic.name} {ks.mode}"
    elif ks is not None:
        key_name = _key_name(ks.sharps, None)
    else:
        key_name = None
    return {
        "title": (md.title or md.movementName) if md is not None else None,
        "composer": md.composer if md is not None else None,
        "time_signature": ts.ratioString if ts is not None else None,
        "key": key_name,
    }


def _symusic_meta(score: symusic.Score) -> dict[str, Any]:
    ts = score.time_signatures[0] if len(score.time_signatures) else None
    ks = score.key_signatures[0] if len(score.key_signatures) else None
    return {
        "time_signature": f"{ts.numerator}/{ts.denominator}" if ts is not None else None,
        "key": _key_name(ks.key, bool(ks.tonality)) if ks is not None and -7 <= ks.key <= 7 else None,
    }


# ----------------------------------------------------------------------------- reading sources


def read_pieces(path: str | os.PathLike, settings: RollSettings = RollSettings()) -> tuple[list[Piece], list[tuple[int, str]]]:
    """Read every piece of one source file.

    Returns `(pieces, skipped)`: `skipped` holds `(index, reason)` for pieces of a multi-piece
    file that could not be read. A file that yields nothing at all raises `BadInput`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise BadInput("empty file")
    if suffix in MIDI_SUFFIXES:
        score = _read_midi(path)
        meta = {"format": "midi", "title": path.stem, **_symusic_meta(score)}
        return [Piece(0, score_to_roll(score, settings), meta)], []
    if suffix in ABC_SUFFIXES:
        return _read_abc(path, settings)
    return _read_music21(path, settings)


def _read_abc(path: Path, settings: RollSettings) -> tuple[list[Piece], list[tuple[int, str]]]:
    text = path.read_bytes().decode("utf-8", errors="replace")
    tunes = split_abc(text)
    if not tunes:
        raise BadInput("no ABC tunes (no X: line)")
    pieces: list[Piece] = []
    skipped: list[tuple[int, str]] = []
    for i, tune in enumerate(tunes):
        f = _abc_fields(tune)
        meta = {"format": "abc", "title": f.get("T") or None, "tune_id": f.get("N") or f.get("X"),
                "time_signature": f.get("M") or None, "key": f.get("K") or None}
        try:
            pieces.append(Piece(i, score_to_roll(abc_tune_to_score(tune), settings), meta))
        except BadInput as e:
            skipped.append((i, str(e)))
    if not pieces:
        raise BadInput(skipped[0][1] if len(skipped) == 1 else f"none of {len(tunes)} tunes readable (first: {skipped[0][1]})")
    return pieces, skipped


def _read_music21(path: Path, settings: RollSettings) -> tuple[list[Piece], list[tuple[int, str]]]:
    from music21 import converter, stream

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = converter.parse(path, forceSource=True, storePickle=False)
    except Exception as e:  # music21 raises many unrelated types for malformed files
        raise BadInput(f"music21 could not parse it ({type(e).__name__}: {str(e)[:200]})") from None
    scores = list(parsed.scores) if isinstance(parsed, stream.Opus) else [parsed]
    pieces: list[Piece] = []
    skipped: list[tuple[int, str]] = []
    for i, s in enumerate(scores):
        try:
            meta = {"format": path.suffix.lower().lstrip("."), **_music21_meta(s)}
            meta["title"] = meta["title"] or path.stem
            pieces.append(Piece(i, score_to_roll(music21_to_score(s), settings), meta))
        except BadInput as e:
            skipped.append((i, str(e)))
    if not pieces:
        raise BadInput(skipped[0][1] if skipped else "no scores in file")
    return pieces, skipped


# ----------------------------------------------------------------------------- the roll cache


def load_settings(cache_dir: str | os.PathLike) -> RollSettings:
    """The `RollSettings` a cache was prepared with."""
    path = Path(cache_dir) / "settings.json"
    if not path.is_file():
        raise FileNotFoundError(f"no prepared roll cache at {cache_dir}: run `midi-rae prepare` for it, or point "
                                f"--cache-dir (or MIDI_RAE_CACHE, data.cache_dir) at the cache the run used")
    return RollSettings(**json.loads(path.read_text()))


def load_index(cache_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The pieces of a prepared cache with their metadata (one dict per `pieces.jsonl` line).

    Keys: piece_id, roll (file name under `rolls/`), source, index, steps, notes, collection,
    composer, title, time_signature, key, format (and tune_id for ABC tunes).
    """
    path = Path(cache_dir) / "pieces.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `midi-rae prepare` first (or pass the cache dir it printed)")
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def load_roll(cache_dir: str | os.PathLike, piece: dict[str, Any], mmap: bool = True) -> np.ndarray:
    """The `(C, 128, T)` uint8 roll of one piece; memory-mapped, so a crop reads only its columns."""
    return np.load(Path(cache_dir) / "rolls" / piece["roll"], mmap_mode="r" if mmap else None)


def work_key(piece_id: str) -> str:
    """The work a piece id names, whatever file format holds it: the source path without its
    music-file suffix, lower-cased (`music21/bach/bwv277.krn` and `.mxl` are one work), plus
    `#<index>` for a piece of a multi-piece file."""
    source, sep, index = piece_id.partition("#")
    stem, dot, suffix = source.rpartition(".")
    if dot and f".{suffix.lower()}" in SUFFIXES:
        source = stem
    return source.lower() + sep + index


def split_of(piece_id: str, val_fraction: float = 0.05) -> str:
    """'train' or 'val' from a hash of the piece's `work_key`: the same on every machine, for any
    file order, and the same for every encoding of one work (no work on both sides)."""
    h = int.from_bytes(hashlib.sha1(work_key(piece_id).encode()).digest()[:8], "big")
    return "val" if h / 2**64 < val_fraction else "train"


def _stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha1(repr(parts).encode()).digest()[:8], "big")


def crop(roll: np.ndarray, start: int, width: int, pitch_shift: int = 0) -> np.ndarray:
    """Columns `start .. start+width` of `roll`, moved up by `pitch_shift` semitones.

    Zero-filled, never wrapped: columns outside the piece and notes moved beyond 0..127 are empty.
    (C, 128, T) -> (C, 128, width)
    """
    c, h, t = roll.shape
    out = np.zeros((c, h, width), dtype=roll.dtype)
    a, b = max(start, 0), min(start + width, t)
    if a >= b or abs(pitch_shift) >= h:
        return out
    src = roll[:, :, a:b]
    if pitch_shift >= 0:
        out[:, pitch_shift:, a - start:b - start] = src[:, :h - pitch_shift]
    else:
        out[:, :h + pitch_shift, a - start:b - start] = src[:, -pitch_shift:]
    return out


class PianoRollDataset(Dataset):
    """Random `(C, 128, crop_width)` crops of the pieces of one split of a prepared cache.

    Items are dicts of tensors: `x` (C, 128, W) float in [0, 1]; with `pair=True` also `x2`, a
    second view of the same passage (`view_mode='piece'`: of another passage of the same piece,
    from its own anchor), and `shift1`, `shift2`: each view's (time, pitch) offset
    from the shared anchor crop, as a long tensor `[dt, dp]`. View k shows the anchor's music
    moved up by dp semitones, starting dt steps later in the piece (zero fill, no wrap).
    Also `piece` (index into `self.pieces`), `start` (anchor's first column), `steps` (the
    piece's length: columns of `x` at or past `steps - start` are padding) and `piece_id`.

    Each piece contributes `ceil(T / crop_width)` items per epoch, so long pieces are not
    under-sampled. Training crops are drawn from `(seed, epoch, index)`: reproducible, with
    any number of loader workers; call `set_epoch` to get new crops. The validation split is
    a fixed set of crops and shifts (no augmentation), identical on every run.
    Near-empty crops (fewer than `min_active` columns with a sounding note) are redrawn.
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
    ) -> None:
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        self.cache_dir = Path(cache_dir)
        self.settings = load_settings(cache_dir)
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
        self.seed, self.epoch = seed, 0
        self.scale = 127.0 if self.settings.velocity else 1.0
        self.pieces = [p for p in load_index(cache_dir) if split == "all" or split_of(p["piece_id"], val_fraction) == split]
        if not self.pieces:
            raise ValueError(f"no pieces in split {split!r} of {cache_dir}")
        counts = [max(1, -(-p["steps"] // crop_width)) for p in self.pieces]
        self._item_end = np.cumsum(counts)  # item i belongs to piece searchsorted(_item_end, i, 'right')

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self._item_end[-1])

    def _rng(self, index: int) -> np.random.Generator:
        # The validation set never changes: its crops depend on the item only.
        epoch = self.epoch if self.split != "val" else -1
        return np.random.default_rng(_stable_seed(self.seed, epoch, index))

    def _anchor(self, roll: np.ndarray, rng: np.random.Generator) -> int:
        """A crop start whose window has at least `min_active` sounding columns, if one is found."""
        t = roll.shape[-1]
        sounding = roll[0].any(axis=0)  # (T,)
        best, best_count = 0, -1
        for _ in range(10):
            start = int(rng.integers(0, max(t - self.crop_width, 0) + 1))
            count = int(sounding[start:start + self.crop_width].sum())
            if count >= self.min_active:
                return start
            if count > best_count:
                best, best_count = start, count
        return best

    def _view(self, roll: np.ndarray, start: int, dt: int, dp: int) -> torch.Tensor:
        x = crop(roll, start + dt, self.crop_width, dp)[: self.channels]
        return torch.from_numpy(x).float().div_(self.scale)  # (C, 128, W)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = int(np.searchsorted(self._item_end, index, side="right"))
        piece = self.pieces[i]
        roll = load_roll(self.cache_dir, piece)
        rng = self._rng(index)
        start = self._anchor(roll, rng)
        base = int(rng.integers(-self.transpose, self.transpose + 1)) if self.transpose else 0
        item: dict[str, Any] = {"piece": i, "piece_id": piece["piece_id"], "start": start, "steps": int(roll.shape[-1])}
        if not self.pair:
            item["x"] = self._view(roll, start, 0, base)
            return item
        t, p = self.max_time_shift, self.max_pitch_shift
        shifts = [(int(rng.integers(-t, t + 1)), int(rng.integers(-p, p + 1))) for _ in range(2)]
        item["x"] = self._view(roll, start, shifts[0][0], base + shifts[0][1])
        # 'piece': view 2 is another passage of the same piece (its own anchor), in its own key.
        start2 = self._anchor(roll, rng) if self.view_mode == "piece" else start
        item["x2"] = self._view(roll, start2, shifts[1][0], base + shifts[1][1])
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
    with `cache_dir`, from a prepared cache by piece id or shell pattern (`music21/bach/*`)."""
    index = load_index(cache_dir) if cache_dir else None
    pieces: list[PieceRoll] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found, _ = read_pieces(path, settings)
            for pc in found:
                name = path.stem if len(found) == 1 else f"{path.stem}-{pc.index}"
                meta = {"source": str(path), "index": pc.index, "steps_per_beat": settings.steps_per_beat, **pc.meta}
                pieces.append(PieceRoll(name, pc.roll.astype(np.float32) / (127.0 if settings.velocity else 1.0), meta))
            continue
        if index is None:
            raise FileNotFoundError(f"{item} is not a file (to encode pieces of a prepared cache by id, pass --cache-dir)")
        matches = [p for p in index if p["piece_id"] == item or fnmatch.fnmatchcase(p["piece_id"], item)]
        if not matches:
            raise FileNotFoundError(f"no piece id matches {item!r} in {cache_dir}")
        cache_settings = load_settings(cache_dir)
        for p in matches:
            roll = load_roll(cache_dir, p, mmap=False).astype(np.float32) / (127.0 if cache_settings.velocity else 1.0)
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
