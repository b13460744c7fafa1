"""Symbolic music <-> piano roll: MIDI, ABC, MusicXML and every other format music21 reads
become rolls, and rolls become MIDI again.

A roll is a `(C, 128, T)` uint8 array: row index = MIDI pitch, one column per time step at
`steps_per_beat` steps per quarter note. Channel 0 is the frame (note sounding), the optional
channel 1 marks onsets, so that a repeated note stays two notes. With `velocity=True` the
channels hold MIDI velocities (1..127) instead of 1.

Between a score and its roll sit its notes, quantised to steps (`NOTE_DTYPE`, sorted by start):
what the cache stores, and what `render` paints any window of the roll from. A roll is the
notes painted in order of increasing velocity, so where notes of one pitch overlap, a pixel
holds the highest velocity among them (its maximum: independent of the order).

Readers: MIDI (.mid .midi .kar) and ABC go through symusic (C++, fast; ABC via its bundled
abc2midi, which also expands repeats); MusicXML, kern and everything else music21 reads go
through music21 (its repeat expander plays repeated sections as written, `expanded`) and are
converted to a symusic `Score`, so that one function makes every roll.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import symusic

PITCHES = 128  # a roll has one row per MIDI pitch (the encoders' img_height)
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
    # Repeated sections played as written out (MusicXML, kern and the rest of music21's formats via
    # its repeat expander; ABC via abc2midi). False: each section once, as notated.
    expand_repeats: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):  # a hand-edited settings.json must not pass as a grid
            value = getattr(self, f.name)
            if type(value) is not type(f.default):
                raise ValueError(f"{f.name} must be of type {type(f.default).__name__}, got {value!r}")
        if not 1 <= self.steps_per_beat <= 96:
            raise ValueError(f"steps_per_beat must be in 1..96, got {self.steps_per_beat}")

    @property
    def channels(self) -> int:
        return 2 if self.onset else 1

    @property
    def scale(self) -> float:
        """What a stored uint8 roll is divided by to give the model's [0, 1] input."""
        return 127.0 if self.velocity else 1.0

    def tag(self) -> str:
        """A default cache folder's suffix: '' at the default time grid, else its names
        ('@spb12', '@spb12-as-written'). Only what a run's config names (`data.steps_per_beat`,
        `data.expand_repeats`), so that training finds the cache that `prepare` made for it."""
        parts = [f"spb{self.steps_per_beat}"] if self.steps_per_beat != 4 else []
        parts += [] if self.expand_repeats else ["as-written"]
        return "@" + "-".join(parts) if parts else ""

    def key_json(self, suffix: str) -> str:
        """The settings that can change what a file of this suffix becomes, as JSON (part of its
        cache key). A MIDI file has no repeats to expand, so its key stays that of caches made
        before `expand_repeats` existed."""
        d = asdict(self)
        if suffix in MIDI_SUFFIXES:
            del d["expand_repeats"]
        return json.dumps(d, sort_keys=True)


@dataclass
class Piece:
    """One piece read from a source file: its notes and its metadata."""

    index: int  # position within the source file (tunes of an ABC book, scores of an opus)
    notes: np.ndarray  # (N,) NOTE_DTYPE, sorted by start
    steps: int  # length of the roll
    meta: dict[str, Any]
    settings: RollSettings

    @property
    def roll(self) -> np.ndarray:
        """The whole piece as a `(C, 128, T)` uint8 roll."""
        return render(self.notes, self.steps, self.settings)


# ----------------------------------------------------------------------------- MIDI <-> roll


def _key_name(sharps: int, minor: bool | None) -> str:
    """'G major' / 'e minor'; a signature without a mode is named by its accidentals ('2 flats')."""
    if minor is not None:
        return f"{_MINOR[sharps + 7]} minor" if minor else f"{_MAJOR[sharps + 7]} major"
    if sharps == 0:
        return "no sharps or flats"
    word = "sharp" if sharps > 0 else "flat"
    return f"{abs(sharps)} {word}" + ("s" if abs(sharps) > 1 else "")


# One note of a roll, in steps: 10 bytes. `start` and `duration` need 32 bits (a roll may be
# MAX_STEPS long); packed, so a piece's notes are one contiguous run of bytes.
NOTE_DTYPE = np.dtype([("start", "<u4"), ("duration", "<u4"), ("pitch", "u1"), ("velocity", "u1")])


def score_to_notes(score: symusic.Score, settings: RollSettings = RollSettings()) -> tuple[np.ndarray, int]:
    """The notes of all (non-drum) tracks of a symusic score, quantised to steps, and the length
    of its roll in steps: `(notes (N,) NOTE_DTYPE sorted by start, steps)`."""
    if score.ticks_per_quarter <= 0:  # resampling would divide by it
        raise BadInput(f"not a readable MIDI file (its header gives {score.ticks_per_quarter} ticks per quarter note)")
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
    cols = {k: np.concatenate([n[k] for n in parts]).astype(np.int64) for k in ("time", "duration", "pitch", "velocity")}
    steps = int((cols["time"] + cols["duration"]).max())
    if steps > MAX_STEPS:
        raise BadInput(f"too long: {steps} steps at {settings.steps_per_beat} per beat (limit {MAX_STEPS})")
    # Only what paints a pixel: pitches of the roll, and (with velocities) notes that are not silent.
    keep = (cols["pitch"] >= 0) & (cols["pitch"] < PITCHES) & (cols["time"] >= 0)
    if settings.velocity:
        keep &= cols["velocity"] > 0
    notes = np.empty(int(keep.sum()), NOTE_DTYPE)
    for name, col in (("start", "time"), ("duration", "duration"), ("pitch", "pitch"), ("velocity", "velocity")):
        notes[name] = cols[col][keep]
    order = np.lexsort((notes["velocity"], notes["duration"], notes["pitch"], notes["start"]))
    return notes[order], steps


def sounding(notes: np.ndarray, steps: int) -> np.ndarray:
    """(T,) bool: the columns of the roll where a note sounds (`roll[0].any(axis=0)`)."""
    end = notes["start"].astype(np.int64) + notes["duration"]
    edges = np.bincount(notes["start"], minlength=steps + 1)[: steps + 1] - np.bincount(end, minlength=steps + 1)[: steps + 1]
    return np.cumsum(edges[:steps]) > 0


def render(notes: np.ndarray, steps: int, settings: RollSettings, start: int = 0, width: int | None = None,
           pitch_shift: int = 0, channels: int | None = None) -> np.ndarray:
    """Columns `start .. start+width` of the piece's roll, moved up by `pitch_shift` semitones,
    painted from its notes: (C, 128, width) uint8, C = `channels` (default: all of `settings`).

    Zero-filled, never wrapped: columns outside `0 .. steps` and notes moved beyond 0..127 are
    empty. Equal to cropping the whole roll (`cache.crop(render(notes, steps, s), ...)`), at
    the cost of the notes in the window instead of the piece's length.
    """
    width = steps - start if width is None else width
    channels = settings.channels if channels is None else min(channels, settings.channels)
    out = np.zeros((channels, PITCHES, width), dtype=np.uint8)
    lo, hi = max(start, 0), min(start + width, steps)
    if lo >= hi or abs(pitch_shift) >= PITCHES:
        return out
    n = notes[: np.searchsorted(notes["start"], hi)]  # notes starting before the window's end
    t0 = n["start"].astype(np.int64)
    t1 = t0 + n["duration"]
    pitch = n["pitch"].astype(np.int64) + pitch_shift
    keep = (t1 > lo) & (pitch >= 0) & (pitch < PITCHES)
    t0, t1, pitch, vel = t0[keep], t1[keep], pitch[keep], n["velocity"][keep]
    a, b = np.maximum(t0, lo) - start, np.minimum(t1, hi) - start  # each note's columns in the window
    lens = b - a
    rows = np.repeat(pitch, lens)
    cols = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens - a, lens)  # a_k .. b_k - 1, note by note
    on = t0 >= lo  # notes whose onset lies in the window
    if settings.velocity:  # overlapping notes of one pitch: the loudest one's velocity
        np.maximum.at(out[0], (rows, cols), np.repeat(vel, lens))
        if channels > 1:
            np.maximum.at(out[1], (pitch[on], t0[on] - start), vel[on])
    else:
        out[0, rows, cols] = 1
        if channels > 1:
            out[1, pitch[on], t0[on] - start] = 1
    return out


def score_to_roll(score: symusic.Score, settings: RollSettings = RollSettings()) -> np.ndarray:
    """Merge all (non-drum) tracks of a symusic score into a `(C, 128, T)` uint8 roll."""
    notes, steps = score_to_notes(score, settings)
    return render(notes, steps, settings)


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


def abc_tune_to_score(tune: str, expand_repeats: bool = True) -> symusic.Score:
    """Parse one ABC tune with symusic (music21 where abc2midi fails); badly formed repeats
    are rejected rather than guessed at. abc2midi always expands repeats, so a tune to be read
    as written (`expand_repeats=False`) goes through music21, which keeps them as notated."""
    if not expand_repeats:
        return _abc_with_music21(tune, "")
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
    return _abc_with_music21(tune, "abc2midi failed; ", expand_repeats=True)


def _abc_with_music21(tune: str, why: str, expand_repeats: bool = False) -> symusic.Score:
    from music21 import converter

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = converter.parse(tune, format="abc")
    except Exception as e:
        raise BadInput(f"unreadable ABC tune ({why}music21: {type(e).__name__}: {str(e)[:120]})") from None
    return music21_to_score(expanded(parsed)[0] if expand_repeats else parsed)


def expanded(score: Any) -> tuple[Any, str]:
    """A music21 score with its repeats (repeat barlines, first and second endings, da capo / dal
    segno marks) played as written out, and how: (score, 'expanded' | 'none' | 'as written: REASON').
    A score whose repeat marks music21 cannot resolve is kept as notated rather than guessed at."""
    from music21 import bar, repeat, spanner

    marks = [*score.recurse().getElementsByClass((bar.Repeat, repeat.RepeatExpression)),
             *score.recurse().getElementsByClass(spanner.RepeatBracket)]
    if not marks:
        return score, "none"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return score.expandRepeats(), "expanded"
    except Exception as e:  # music21's ExpanderException and whatever an odd score trips inside it
        return score, f"as written: {type(e).__name__}: {str(e)[:80]}"


def music21_to_score(stream: Any) -> symusic.Score:
    """Convert a music21 score to a symusic score: one track per part, tied notes merged.

    Chord symbols (harmony annotations) and grace notes (zero duration) are not sounding
    notes of the score and are left out; repeats are played once, as notated (see `expanded`).
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
            if 0 <= pitch < PITCHES:
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
        # the work this file is a part of, where it says (Humdrum !!!OPR: the mass of a Kyrie)
        "parent_work": getattr(md, "parentTitle", None) or None if md is not None else None,
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
        return [Piece(0, *score_to_notes(score, settings), meta, settings)], []
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
            pieces.append(Piece(i, *score_to_notes(abc_tune_to_score(tune, settings.expand_repeats), settings), meta, settings))
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
            if settings.expand_repeats:
                s, meta["repeats"] = expanded(s)
            pieces.append(Piece(i, *score_to_notes(music21_to_score(s), settings), meta, settings))
        except BadInput as e:
            skipped.append((i, str(e)))
    if not pieces:
        raise BadInput(skipped[0][1] if skipped else "no scores in file")
    return pieces, skipped
