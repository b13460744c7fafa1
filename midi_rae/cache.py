"""The roll cache and metadata table: built from music files, resumably (`prepare`, the data layer
under `midi-rae prepare`, which `run` also calls before training), and read back (its settings,
its index of pieces, one piece's roll, and the train/val split of the pieces).

Cache layout (`cache_dir/`):

- `rolls/<key>-<i>.npy`: one `(C, 128, T)` uint8 roll per piece (np.load(..., mmap_mode="r")).
- `done/<key>.json`: per source file, written last: its pieces' metadata or why it was skipped.
  A source whose `done` file exists is finished; this is what makes a restarted run resume.
- `pieces.jsonl`: the metadata table, one piece per line, sorted by piece id.
- `report.txt`: one line per skipped file or tune with the reason, then the summary.
- `settings.json`: the `RollSettings` the rolls were made with.

`<key>` hashes the source id, the file's content and the settings, so an edited file or changed
settings never reuse a stale roll. Every file is written to a temporary name, then renamed.
A file that cannot even be hashed (a name that is not UTF-8, no read permission, over the size
limit) gets a report line and no `done` record, so that it is looked at again once fixed.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from tqdm import tqdm

from midi_rae.corpus import corpus_files
from midi_rae.roll import SUFFIXES, BadInput, RollSettings, read_pieces
from midi_rae.utils import atomic_write


# ----------------------------------------------------------------------------- building a cache


@dataclass(frozen=True)
class Source:
    path: Path
    source_id: str  # stable name: piece ids and the train/val split derive from it
    collection: str | None = None
    composer: str | None = None


@dataclass
class Summary:
    cache_dir: Path
    files: int = 0  # source files given
    files_skipped: int = 0
    pieces: int = 0  # pieces in the cache (good)
    pieces_skipped: int = 0  # skipped tunes of multi-piece files + skipped files
    processed: int = 0  # source files converted in this run (the rest were already done)
    report: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"{self.pieces} pieces good, {self.pieces_skipped} skipped ({self.files - self.files_skipped}/{self.files} files readable)"


def default_cache_dir(paths: Iterable[str | os.PathLike] | None = None, collections: Iterable[str] | None = None) -> Path:
    """`$MIDI_RAE_CACHE`, else the user cache dir (`$XDG_CACHE_HOME` or `~/.cache`)`/midi-rae/`,
    then `corpus` for the whole bundled corpus, `corpus-<collections>` for some of its folders
    (a subset never passes for, or replaces, the full cache), or `data-<hash of the resolved
    input paths>`. `prepare` and `train` both resolve their cache here."""
    base = os.environ.get("MIDI_RAE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "midi-rae"
    if not paths:
        return Path(base) / "-".join(["corpus", *sorted(set(collections or ()))])
    digest = hashlib.sha1("\0".join(sorted(str(Path(p).resolve()) for p in paths)).encode()).hexdigest()[:10]
    return Path(base) / f"data-{digest}"


def collect_sources(paths: Iterable[str | os.PathLike]) -> list[Source]:
    """Files given, and the music files under folders given (recursive), sorted by source id.

    The source id is the path relative to the given folder's parent (`folder/sub/x.mid`), or
    the file name for a file given directly, so it does not depend on where the data lives.
    """
    sources: dict[str, Source] = {}
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in SUFFIXES:
                    sid = f.relative_to(p.parent).as_posix()
                    sources[sid] = Source(f, sid, collection=p.name)
        elif p.is_file():
            sources[p.name] = Source(p, p.name)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return [sources[k] for k in sorted(sources)]


# Far above any real MIDI, ABC or MusicXML file (the bundled corpus's largest is about 1.3 MB); a
# bigger one is a mistake or hostile, and its parse alone could exhaust a worker's memory.
MAX_FILE_MB = 64


def _display_name(source_id: str) -> str:
    """The source id as printable text: bytes of a non-UTF-8 file name shown as \\xNN escapes."""
    return os.fsencode(source_id).decode("utf-8", "backslashreplace")


def _key(source: Source, settings: RollSettings, max_bytes: int) -> str:
    """The cache key, hashing the file in chunks; BadInput (the report's reason) if it cannot be read."""
    try:
        sid = source.source_id.encode()
    except UnicodeEncodeError:  # a name decoded with surrogate escapes
        raise BadInput("the file name is not valid UTF-8; rename the file") from None
    h = hashlib.sha1(sid + b"\0" + settings.to_json().encode() + b"\0")
    try:
        size = source.path.stat().st_size
        if size > max_bytes:
            raise BadInput(f"too large: {size / 2**20:.0f} MB (limit {max_bytes / 2**20:g} MB; raise it with --max-file-mb)")
        with source.path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        hint = "; check its permissions" if isinstance(e, PermissionError) else ""
        raise BadInput(f"cannot read the file ({e.strerror or e}){hint}") from None
    return h.hexdigest()[:20]


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _save_roll(path: Path, roll: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object: np.save would append .npy to a name
            np.save(f, np.ascontiguousarray(roll))

    atomic_write(path, write)


def _convert(source: Source, key: str, settings: RollSettings, cache_dir: Path) -> dict[str, Any]:
    """Worker: read one source file, write its rolls, then its `done` record (last, atomically)."""
    inflight = cache_dir / "inflight" / key
    inflight.touch()  # left behind only if this process dies mid-file: names the suspect
    warnings.simplefilter("ignore")
    record: dict[str, Any] = {"source": source.source_id, "pieces": [], "skipped": []}
    try:
        pieces, skipped = read_pieces(source.path, settings)
    except BadInput as e:
        record["error"] = str(e)
    except Exception as e:  # a parser bug must not stop the batch; its message is the reason
        record["error"] = f"{type(e).__name__}: {e}"
    else:
        multi = source.path.suffix.lower() == ".abc" or len(pieces) + len(skipped) > 1
        for p in pieces:
            name = f"{key}-{p.index}.npy"
            _save_roll(cache_dir / "rolls" / name, p.roll)
            record["pieces"].append({
                "piece_id": f"{source.source_id}#{p.index}" if multi else source.source_id,
                "roll": name, "source": source.source_id, "index": p.index,
                "steps": int(p.roll.shape[-1]), "notes": int((p.roll[1] > 0).sum()) if settings.onset else None,
                "collection": source.collection, **p.meta,
                "composer": source.composer or p.meta.get("composer"),
            })
        record["skipped"] = [[i, reason] for i, reason in skipped]
    _atomic_write(cache_dir / "done" / f"{key}.json", json.dumps(record, sort_keys=True).encode())
    inflight.unlink(missing_ok=True)
    return record


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: end this worker once the prepare process is gone (even killed by
    SIGKILL, which it cannot catch), rather than converting on as an orphan."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _crashed(source: Source, key: str, cache_dir: Path) -> None:
    record = {"source": source.source_id, "pieces": [], "skipped": [], "error": "the reader crashed (worker process died)"}
    _atomic_write(cache_dir / "done" / f"{key}.json", json.dumps(record, sort_keys=True).encode())
    (cache_dir / "inflight" / key).unlink(missing_ok=True)


def _run(todo: list[tuple[Source, str]], settings: RollSettings, cache_dir: Path, workers: int, bar: tqdm) -> None:
    """Convert `todo` in a process pool. If a worker dies (e.g. a parser segfault), the files
    that were in flight are retried one per pool; one that kills its pool alone is reported."""
    queue, suspects = list(todo), []
    while queue or suspects:
        solo = bool(suspects)
        batch = [suspects.pop(0)] if solo else queue
        if not solo:
            queue = []
        broken = []
        with ProcessPoolExecutor(1 if solo else workers, initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(_convert, s, k, settings, cache_dir): (s, k) for s, k in batch}
            for f in as_completed(futures):
                try:
                    f.result()
                    bar.update()
                except BrokenProcessPool:
                    broken.append(futures[f])
        if solo and broken:
            _crashed(*broken[0], cache_dir)
            bar.update()
        elif broken:
            # Files with an in-flight marker were being read when the pool died; the rest never started.
            inflight = {p.name for p in (cache_dir / "inflight").iterdir()}
            suspects += [t for t in broken if t[1] in inflight]
            queue = [t for t in broken if t[1] not in inflight]
            for name in inflight:
                (cache_dir / "inflight" / name).unlink(missing_ok=True)


def prepare(
    paths: list[str | os.PathLike] | None = None,
    cache_dir: str | os.PathLike | None = None,
    settings: RollSettings = RollSettings(),
    workers: int | None = None,
    progress: bool = True,
    collections: list[str] | None = None,
    max_file_mb: float = MAX_FILE_MB,
) -> Summary:
    """Convert the given files/folders (or, with no paths, the bundled music21 corpus) into a
    roll cache. Resumable and idempotent: sources already done (same content and settings)
    are not read again. `collections` restricts the bundled corpus to some of its folders;
    files over `max_file_mb` megabytes are skipped with a report line."""
    if paths:
        sources = collect_sources(paths)
    else:
        sources = [Source(f.path, f.source_id, f.collection, f.composer) for f in corpus_files(collections)]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(paths, collections)
    for sub in ("rolls", "done", "inflight"):
        (cache / sub).mkdir(parents=True, exist_ok=True)
    # Leftovers of a run that was killed: in-flight markers and half-written temporary files.
    for stale in [*(cache / "inflight").iterdir(), *cache.glob("*/.*.tmp"), *cache.glob(".*.tmp")]:
        stale.unlink()
    keys: list[str | None] = []
    unreadable: dict[int, dict[str, Any]] = {}  # source index -> its error record (never written to done/)
    for i, s in enumerate(sources):
        try:
            keys.append(_key(s, settings, int(max_file_mb * 2**20)))
        except BadInput as e:
            keys.append(None)
            unreadable[i] = {"source": _display_name(s.source_id), "pieces": [], "skipped": [], "error": str(e)}
    todo = [(s, k) for s, k in zip(sources, keys) if k is not None and not (cache / "done" / f"{k}.json").exists()]
    # Largest files first, so that a long score does not start last and keep one core busy alone.
    todo.sort(key=lambda t: (-t[0].path.stat().st_size, t[0].source_id))
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(todo)))
    with tqdm(total=len(todo), desc="prepare", unit="file", disable=not progress or not todo) as bar:
        _run(todo, settings, cache, workers, bar)
    records = [unreadable[i] if k is None else json.loads((cache / "done" / f"{k}.json").read_text())
               for i, k in enumerate(keys)]
    summary = _write_index(cache, records, settings)
    summary.processed = len(todo)
    return summary


def _write_index(cache: Path, records: list[dict[str, Any]], settings: RollSettings) -> Summary:
    """Write pieces.jsonl, report.txt and settings.json from the `done` records (in source order)."""
    summary = Summary(cache, files=len(records))
    pieces = sorted((p for r in records for p in r["pieces"]), key=lambda p: p["piece_id"])
    for r in records:
        if "error" in r:
            summary.files_skipped += 1
            summary.report.append(f"SKIP {r['source']}: {r['error']}")
        summary.report += [f"SKIP {r['source']}#{i}: {reason}" for i, reason in r["skipped"]]
    summary.pieces, summary.pieces_skipped = len(pieces), len(summary.report)
    _write_if_changed(cache / "pieces.jsonl", "".join(json.dumps(p, sort_keys=True, ensure_ascii=False) + "\n" for p in pieces))
    _write_if_changed(cache / "report.txt", "".join(l + "\n" for l in summary.report) + summary.line() + "\n")
    _write_if_changed(cache / "settings.json", json.dumps(asdict(settings), sort_keys=True, indent=1) + "\n")
    return summary


def _write_if_changed(path: Path, text: str) -> None:
    # A second run over finished inputs then touches nothing at all.
    data = text.encode()
    if not path.exists() or path.read_bytes() != data:
        _atomic_write(path, data)


# ----------------------------------------------------------------------------- reading a cache


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
