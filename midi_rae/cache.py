"""The note cache and metadata table: built from music files, resumably (`prepare`, the data layer
under `midi-rae prepare`, which `run` also calls before training), and read back (its settings,
its index of pieces, one piece's notes or roll, crops of it, and the train/val split).

A piece is stored as its notes (`roll.NOTE_DTYPE`: start, duration, pitch, velocity; 10 bytes
each), not as its roll: rolls are mostly zeros, and any window of one is painted from the notes
in the window when it is read (`roll.render`), equal to the dense roll's crop.

Cache layout (`cache_dir/`):

- `index.json`: written last; names the files below that make the cache (`format`, `index`,
  `shards`). Everything it names is complete; a file it does not name is a leftover.
- `notes/<NN>-<digest>.npy`: shard NN: the notes of its pieces (those whose source key falls in
  it), piece after piece in piece id order. One `(N,)` structured array, memory-mapped on read.
- `index-<digest>.npy`: one row per piece, in piece id order: piece_id, shard, offset, count
  (where its notes are), steps (its length) and split (its work's hash in [0, 1), see `split_of`):
  what a Dataset needs, as numpy columns shared by every loader worker.
- `pieces.jsonl`: the metadata table, one piece per line, sorted by piece id; `work` is what the
  split groups (`work_key`, joined by a parent work the file states: `work_groups`).
- `done.jsonl`: one record per source file (by key): its pieces' metadata, or why it was skipped.
- `report.txt`: one line per skipped file or tune with the reason, then the summary.
- `settings.json`: the `RollSettings` the notes were made with.

While it runs, `prepare` writes each converted source file's notes to `staging/<key>.npy` and
then its record to `done/<key>.json` (the record last: a source whose record exists is finished,
which is what makes a killed run resume); at the end it packs them into the shards (only the
shards whose pieces changed are rewritten), commits `index.json`, then removes the staged files
and every file the new `index.json` does not name.

`<key>` hashes the source id, the file's content and the settings, so an edited file or changed
settings never reuse stale notes. Every file is written to a temporary name, then renamed: a full
disk or a kill leaves the previous cache whole. A file that cannot even be hashed (a name that is
not UTF-8, no read permission, over the size limit) gets a report line and no record, so that it
is looked at again once fixed.

Earlier versions stored dense rolls (`rolls/<key>-<i>.npy`, pieces with a `roll` field); such a
cache is still read (Dataset, `load_roll`), but `prepare` does not add to it (see `OldCacheError`).
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import posixpath
import re
import threading
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from array import array
from dataclasses import asdict, dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from midi_rae.corpus import corpus_files
from midi_rae.roll import NOTE_DTYPE, SUFFIXES, BadInput, RollSettings, read_pieces, render, sounding
from midi_rae.utils import atomic_write, atomic_write_bytes


# ----------------------------------------------------------------------------- building a cache


@dataclass(frozen=True, slots=True)
class Source:
    file: str  # its path; a str, not a Path: a Path object per file took half a kilobyte, 50 MB at 100k files
    source_id: str  # stable name: piece ids and the train/val split derive from it
    collection: str | None = None
    composer: str | None = None

    @property
    def path(self) -> Path:
        return Path(self.file)

    @property
    def suffix(self) -> str:
        """`path.suffix` without building a Path: a Path interns each part of its file name in
        the interpreter's table for good, about 200 bytes per file of the corpus."""
        name = os.path.basename(self.file)
        i = name.rfind(".")
        return name[i:] if 0 < i < len(name) - 1 else ""


class Sources:
    """The source files of a `prepare`, sorted by source id (of equal ids, the last given), as
    columns: every path and every id as bytes in one buffer each (`os.fsencode`, so that any file
    name comes back as it was), collection and composer as codes into their few names. 32 bytes
    per file beside the bytes of its path and id (a `Source` per file, its strings and a list
    slot held about 170 more): the file list is what `prepare` keeps for the whole run.
    `sources[i]` builds one `Source`."""

    def __init__(self, rows: Iterable[tuple[str, str, str | None, str | None]]) -> None:
        files, ids, starts = bytearray(), bytearray(), array("q", [0, 0])  # (file end, id end) per row
        codes: dict[str | None, int] = {}
        labels = array("i")  # (collection, composer) code pairs
        for file, source_id, collection, composer in rows:
            files += os.fsencode(file)
            ids += source_id.encode("utf-8", "surrogateescape")
            starts += array("q", (len(files), len(ids)))
            for name in (collection, composer):
                labels.append(codes.setdefault(name, len(codes)))
        self.names = list(codes)  # the distinct collections and composers
        self._files, self._ids = np.frombuffer(bytes(files), np.uint8), np.frombuffer(bytes(ids), np.uint8)
        ends = np.frombuffer(starts, np.int64).reshape(-1, 2)  # (N + 1, 2)
        self._file_at, self._id_at = ends[:, 0].copy(), ends[:, 1].copy()
        self._labels = np.frombuffer(labels, np.int32).reshape(-1, 2).copy()  # (N, 2)
        # The rows by id, the last row of each id kept (as a dict by id would); bytes sort as the
        # ids do (UTF-8 keeps code-point order).
        table = _fixed_width(self._ids, self._id_at)
        order = np.argsort(table, kind="stable")
        last = np.append(table[order][1:] != table[order][:-1], True) if len(table) else np.zeros(0, bool)
        self._order = order[last]  # (M,) row of the i-th source in id order

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, i: int) -> Source:
        j = int(self._order[i])
        file = os.fsdecode(self._files[self._file_at[j]:self._file_at[j + 1]].tobytes())
        source_id = self._ids[self._id_at[j]:self._id_at[j + 1]].tobytes().decode("utf-8", "surrogateescape")
        collection, composer = (self.names[c] for c in self._labels[j])
        return Source(file, source_id, collection, composer)

    def __iter__(self) -> Iterator[Source]:
        return (self[i] for i in range(len(self)))


@dataclass
class Summary:
    cache_dir: Path
    files: int = 0  # source files given
    files_skipped: int = 0
    pieces: int = 0  # pieces in the cache (good)
    pieces_skipped: int = 0  # skipped tunes of multi-piece files + skipped files
    processed: int = 0  # source files converted in this run
    refused: int = 0  # source files skipped before conversion (too large, unreadable, a bad name)
    report: list[str] = field(default_factory=list)
    notice: str | None = None  # a line for the user about the cache itself (an earlier version's, ...)

    def add(self, record: dict[str, Any]) -> None:
        """Count one source's record (its pieces, or why it or some of its pieces were skipped)."""
        self.files += 1
        if "error" in record:
            self.files_skipped += 1
            self.report.append(f"SKIP {record['source']}: {record['error']}")
        self.report += [f"SKIP {record['source']}#{i}: {reason}" for i, reason in record["skipped"]]
        self.pieces_skipped += int("error" in record) + len(record["skipped"])
        self.pieces += len(record["pieces"])

    def line(self) -> str:
        return f"{self.pieces} pieces good, {self.pieces_skipped} skipped ({self.files - self.files_skipped}/{self.files} files readable)"


def default_cache_dir(paths: Iterable[str | os.PathLike] | None = None, collections: Iterable[str] | None = None,
                      settings: RollSettings = RollSettings()) -> Path:
    """`$MIDI_RAE_CACHE`, else the user cache dir (`$XDG_CACHE_HOME` or `~/.cache`)`/midi-rae/`,
    then `corpus` for the whole bundled corpus, `corpus-<collections>` for some of its folders
    (a subset never passes for, or replaces, the full cache), or `data-<hash of the resolved
    input paths>`; a time grid other than the default adds its name (`corpus@spb12`,
    `RollSettings.tag`), so that two resolutions of one corpus never replace each other. `prepare` and `train` both resolve
    their cache here."""
    base = os.environ.get("MIDI_RAE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "midi-rae"
    if not paths:
        name = "-".join(["corpus", *sorted(set(collections or ()))])
    else:
        digest = hashlib.sha1("\0".join(sorted(str(Path(p).resolve()) for p in paths)).encode()).hexdigest()[:10]
        name = f"data-{digest}"
    return Path(base) / (name + settings.tag())


def collect_sources(paths: Iterable[str | os.PathLike]) -> Sources:
    """Files given, and the music files under folders given (recursive), sorted by source id.

    The source id is the path relative to the given folder's parent (`folder/sub/x.mid`), or
    the file name for a file given directly, so it does not depend on where the data lives.
    """
    def rows() -> Iterator[tuple[str, str, str | None, None]]:
        for p in map(Path, paths):
            if p.is_dir():
                # os.walk, not rglob: strings, not a Path object per file (the same files: neither
                # descends into a linked folder, both list linked files)
                for root, _, names in os.walk(p):
                    for name in names:
                        f = os.path.join(root, name)
                        if os.path.splitext(name)[1].lower() in SUFFIXES and os.path.isfile(f):
                            yield f, posixpath.join(p.name, os.path.relpath(f, p).replace(os.sep, "/")), p.name, None
            elif p.is_file():
                yield str(p), p.name, None, None
            else:
                raise FileNotFoundError(f"{p}: no such file or folder")

    return Sources(rows())


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
    h = hashlib.sha1(sid + b"\0" + settings.key_json(source.suffix.lower()).encode() + b"\0" + FORMAT.encode() + b"\0")
    try:
        size = os.stat(source.file).st_size
        if size > max_bytes:
            raise BadInput(f"too large: {size / 2**20:.0f} MB (limit {max_bytes / 2**20:g} MB; raise it with --max-file-mb)")
        with open(source.file, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        hint = "; check its permissions" if isinstance(e, PermissionError) else ""
        raise BadInput(f"cannot read the file ({e.strerror or e}){hint}") from None
    return h.hexdigest()[:20]


def _convert(source: Source, key: str, settings: RollSettings, cache_dir: Path) -> dict[str, Any]:
    """Worker: read one source file, stage its notes, then write its `done` record (last, atomically)."""
    inflight = cache_dir / "inflight" / key
    inflight.touch()  # left behind only if this process dies mid-file: names the suspect
    try:
        record = _stage(source, key, settings, cache_dir)
        atomic_write_bytes(cache_dir / "done" / f"{key}.json", json.dumps(record, sort_keys=True).encode())
    finally:  # an exception (a full disk) ends the file here; only a killed process leaves the marker
        inflight.unlink(missing_ok=True)
    return record


def _stage(source: Source, key: str, settings: RollSettings, cache_dir: Path) -> dict[str, Any]:
    """Read one source file and write its notes to `staging/<key>.npy`; its record (not yet written)."""
    warnings.simplefilter("ignore")
    record: dict[str, Any] = {"key": key, "source": source.source_id, "pieces": [], "skipped": []}
    try:
        pieces, skipped = read_pieces(source.path, settings)
    except BadInput as e:
        record["error"] = str(e)
        return record
    except Exception as e:  # a parser bug must not stop the batch; its message is the reason
        record["error"] = f"{type(e).__name__}: {e}"
        return record
    multi = source.suffix.lower() == ".abc" or len(pieces) + len(skipped) > 1
    staged = f"staging/{key}.npy"
    offset = 0
    for p in pieces:
        record["pieces"].append({
            "piece_id": f"{source.source_id}#{p.index}" if multi else source.source_id,
            "file": staged, "offset": offset, "count": len(p.notes),
            "source": source.source_id, "index": p.index, "steps": p.steps, "notes": len(p.notes),
            "collection": source.collection, **p.meta,
            "composer": source.composer or p.meta.get("composer"),
        })
        offset += len(p.notes)
    record["skipped"] = [[i, reason] for i, reason in skipped]
    _save_notes(cache_dir / staged, [p.notes for p in pieces])
    return record


def _save_notes(path: Path, parts: Iterable[np.ndarray], total: int | None = None) -> None:
    """Write the concatenation of `parts` (NOTE_DTYPE arrays) as one `.npy`, part by part, so that
    memory holds one part at a time whatever the total (given when `parts` is a generator)."""
    parts = parts if total is not None else list(parts)
    total = total if total is not None else sum(len(p) for p in parts)

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            header = {"descr": np.lib.format.dtype_to_descr(NOTE_DTYPE), "fortran_order": False, "shape": (total,)}
            np.lib.format.write_array_header_1_0(f, header)
            for part in parts:
                f.write(np.ascontiguousarray(part, dtype=NOTE_DTYPE).tobytes())

    atomic_write(path, write)


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: end this worker once the prepare process is gone (even killed by
    SIGKILL, which it cannot catch), rather than converting on as an orphan."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _crashed(source: Source, key: str, cache_dir: Path) -> None:
    record = {"key": key, "source": source.source_id, "pieces": [], "skipped": [], "error": "the reader crashed (worker process died)"}
    atomic_write_bytes(cache_dir / "done" / f"{key}.json", json.dumps(record, sort_keys=True).encode())
    (cache_dir / "inflight" / key).unlink(missing_ok=True)


def _run(todo: Iterable[tuple[Source, str]], settings: RollSettings, cache_dir: Path, workers: int, bar: tqdm) -> None:
    """Convert `todo` in a process pool. If a worker dies (e.g. a parser segfault), the files
    that were in flight are retried one per pool; one that kills its pool alone is reported.
    An OSError writing the cache (a full disk) stops the run: nothing queued is started.
    `todo` is drawn as the pool takes it, a few files per worker at a time: the futures of a
    100k-file corpus, each holding its record once done, would otherwise all sit in memory
    until the end (and so would the list of what is left)."""
    queue: Iterator[tuple[Source, str]] = iter(todo)
    suspects: list[tuple[Source, str]] = []
    while True:
        solo = bool(suspects)
        batch = iter([suspects.pop(0)]) if solo else queue
        first = list(islice(batch, 4 * workers))
        if not first:
            return
        broken: list[tuple[Source, str]] = []
        with ProcessPoolExecutor(1 if solo else workers, initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
            running = {pool.submit(_convert, s, k, settings, cache_dir): (s, k) for s, k in first}
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in finished:
                    item = running.pop(f)
                    try:
                        f.result()
                        bar.update()
                    except BrokenProcessPool:
                        broken.append(item)
                    except OSError:
                        for g in running:
                            g.cancel()
                        raise
                if not broken:
                    running.update({pool.submit(_convert, s, k, settings, cache_dir): (s, k) for s, k in islice(batch, len(finished))})
        if solo and broken:
            _crashed(*broken[0], cache_dir)
            bar.update()
        elif broken:
            # Files with an in-flight marker were being read when the pool died; the rest never
            # started, and go back in front of what was never submitted (the rest of `batch`).
            inflight = {p.name for p in (cache_dir / "inflight").iterdir()}
            suspects += [t for t in broken if t[1] in inflight]
            queue = chain([t for t in broken if t[1] not in inflight], batch)
            for name in inflight:
                (cache_dir / "inflight" / name).unlink(missing_ok=True)


class OldCacheError(ValueError):
    """`prepare` was pointed at a dense roll cache of an earlier version that lacks some inputs."""


def _rebuild_command(paths: list[str | os.PathLike] | None, cache: Path, collections: list[str] | None) -> str:
    args = [str(p) for p in paths or ()] + (["--collections", *collections] if collections else [])
    return " ".join(["midi-rae prepare", *args, "--cache-dir", str(cache)])


def _fixed_width(buffer: bytes | bytearray | np.ndarray, ends: np.ndarray) -> np.ndarray:
    """(N,) fixed-width bytes array of the N strings packed in `buffer`, string i ending at
    ends[i + 1] (ends[0] = 0): a sortable column without a Python object per string."""
    view = memoryview(buffer)
    out = np.zeros(len(ends) - 1, f"S{int(np.diff(ends).max(initial=1))}")
    for i, (a, b) in enumerate(zip(ends[:-1].tolist(), ends[1:].tolist())):
        out[i] = view[a:b].tobytes()
    return out


def _bytes_array(items: Iterable[bytes], chunk: int = 4096) -> np.ndarray:
    """(N,) numpy bytes array of `items`, built a few thousand at a time: a list of all of them
    first would hold a Python object (about 60 bytes) per item."""
    parts, it = [np.zeros(0, "S1")], iter(items)
    while block := list(islice(it, chunk)):
        parts.append(np.array(block, dtype=bytes))
    return np.concatenate(parts)


class _Done:
    """The records of finished sources by key: packed ones (lines of `done.jsonl`) and those
    converted since (`done/<key>.json`). It holds where each record is, not the records, and
    reads one when asked; the keys and offsets sit in sorted numpy arrays (about 30 bytes per
    source: a dict of str keys took 120)."""

    def __init__(self, cache: Path) -> None:
        self.cache, self.file = cache, None
        keys: Iterator[bytes] = iter(())
        offsets = array("q")
        if (cache / "done.jsonl").exists():
            # Kept open: after `done.jsonl` is replaced, this handle still reads the file it indexed.
            self.file = (cache / "done.jsonl").open("rb")

            def read() -> Iterator[bytes]:
                offset = 0
                for line in self.file:
                    offsets.append(offset)
                    offset += len(line)
                    yield json.loads(line)["key"].encode()

            keys = read()
        self.packed = _bytes_array(keys)  # (S,) sorted: done.jsonl is written in key order
        self.offsets = np.frombuffer(offsets, np.int64) if offsets else np.zeros(0, np.int64)
        if not np.all(self.packed[:-1] < self.packed[1:]):  # written by hand, or an older version
            order = np.argsort(self.packed, kind="stable")
            self.packed, self.offsets = self.packed[order], self.offsets[order]
        self.rescan()

    def rescan(self) -> None:
        """List `done/` again, after conversions added to it (`done.jsonl` changes only in a pack)."""
        with os.scandir(self.cache / "done") as entries:
            self.fresh = np.sort(_bytes_array(e.name[:-5].encode() for e in entries if e.name.endswith(".json")))

    @staticmethod
    def _find(table: np.ndarray, key: str) -> int | None:
        """The row of `key` in the sorted array `table`, or None."""
        k = key.encode()
        i = int(np.searchsorted(table, k))
        return i if i < len(table) and table[i] == k else None

    def __contains__(self, key: str) -> bool:
        return self._find(self.fresh, key) is not None or self._find(self.packed, key) is not None

    def __getitem__(self, key: str) -> dict[str, Any]:
        if self._find(self.fresh, key) is not None:  # newer than a line of done.jsonl with the same key
            return json.loads((self.cache / "done" / f"{key}.json").read_bytes())
        row = self._find(self.packed, key)
        if row is None:
            raise KeyError(key)
        self.file.seek(int(self.offsets[row]))
        return json.loads(self.file.readline())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


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
    note cache. Resumable and idempotent: sources already done (same content and settings)
    are not read again; the cache then holds the pieces of exactly these sources. `collections`
    restricts the bundled corpus to some of its folders; files over `max_file_mb` megabytes are
    skipped with a report line. A dense cache of an earlier version that holds every source is
    used as it is; one that lacks some raises `OldCacheError` (nothing is deleted)."""
    # Checked here, not only by the CLI: 0 would otherwise pass for "the default" (`workers or ...`).
    if (workers is not None and workers < 1) or not max_file_mb > 0:
        raise ValueError(f"--workers must be at least 1 and --max-file-mb positive; got {workers}, {max_file_mb}")
    if paths:
        sources = collect_sources(paths)
    else:
        sources = Sources((str(f.path), f.source_id, f.collection, f.composer) for f in corpus_files(collections))
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(paths, collections, settings)
    # keys[i]: source i's key; b"" where the file cannot be hashed (`unreadable` holds its record,
    # never written to done/). One fixed-width array: a str per file took 70 bytes more.
    keys = np.zeros(len(sources), "S20")
    unreadable: dict[int, dict[str, Any]] = {}
    for i, s in enumerate(sources):
        try:
            keys[i] = _key(s, settings, int(max_file_mb * 2**20))
        except BadInput as e:
            unreadable[i] = {"source": _display_name(s.source_id), "pieces": [], "skipped": [], "error": str(e)}
    if is_dense(cache):
        return _old_cache(cache, keys, unreadable, _rebuild_command(paths, cache, collections))
    check_cache_folder(cache)
    for sub in ("notes", "staging", "done", "inflight"):
        (cache / sub).mkdir(parents=True, exist_ok=True)
    # Leftovers of a run that was killed: in-flight markers and half-written temporary files.
    for stale in [*(cache / "inflight").iterdir(), *cache.glob("*/.*.tmp"), *cache.glob(".*.tmp")]:
        stale.unlink()
    done = _Done(cache)
    try:
        todo = np.fromiter((i for i, k in enumerate(keys) if k and k.decode() not in done), dtype=np.int64)
        if len(todo):
            # Largest files first, so that a long score does not start last and keep one core busy
            # alone (of equal sizes, by source id: the order of the sources).
            sizes = np.array([os.stat(sources[i].file).st_size for i in todo], dtype=np.int64)
            todo = todo[np.lexsort((todo, -sizes))]
            workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(todo)))
            with tqdm(total=len(todo), desc="prepare", unit="file", disable=not progress) as bar:
                _run(((sources[i], keys[i].decode()) for i in todo.tolist()), settings, cache, workers, bar)
            done.rescan()
        summary = _pack(cache, keys, unreadable, done, settings, progress)
    finally:
        done.close()
    summary.processed, summary.refused = len(todo), len(unreadable)
    return summary


def _old_cache(cache: Path, keys: np.ndarray, unreadable: dict[int, dict[str, Any]], command: str) -> Summary:
    """The summary of a dense cache of an earlier version that holds every source; else OldCacheError."""
    missing = sum(1 for k in keys if k and not (cache / "done" / f"{k.decode()}.json").exists())
    if missing:
        raise OldCacheError(
            f"{cache} holds a dense roll cache of an earlier midi-rae version, which prepare no longer adds to "
            f"({missing} of {len(keys)} files are not in it; train, probe and encode still read it as it is). "
            f"To rebuild it as a note cache (about 20x smaller), move it away (e.g. to {cache.name}.dense) and run "
            f"`{command}`, or give --cache-dir another folder")
    records = (unreadable[i] if not k else json.loads((cache / "done" / f"{k.decode()}.json").read_text())
               for i, k in enumerate(keys))
    summary = _summarize(cache, records)
    summary.refused = len(unreadable)  # as `prepare` counts them: not "already in the cache"
    summary.notice = (f"{cache} is a dense roll cache of an earlier midi-rae version holding every input: used as it "
                      f"is; move it away and run `{command}` to rebuild it as a note cache (about 20x smaller)")
    return summary


def _summarize(cache: Path, records: Iterable[dict[str, Any]]) -> Summary:
    summary = Summary(cache)
    for r in records:
        summary.add(r)
    return summary


NUM_SHARDS = 16  # adding or changing one source rewrites one shard: about 1/16 of the notes
# 2: pieces have a `work` (their split groups a mass's sections, a work's movements); a record of
# another format is made again (the format is part of the key).
FORMAT = "midi-rae notes 2"


def _shard_of(key: str) -> int:
    return int(key[:8], 16) % NUM_SHARDS


def _pack(cache: Path, keys: np.ndarray, unreadable: dict[int, dict[str, Any]], done: _Done,
          settings: RollSettings, progress: bool) -> Summary:
    """Pack the staged notes into shards and write the index, tables and report (the report in
    source order of `keys`; b"": the source `unreadable` holds); commit with `index.json`; then
    remove what it does not name. Records are read one at a time, in three passes (here, then
    for each table: `done.jsonl` in key order, `pieces.jsonl` in piece-id order); between the
    passes memory holds a few numbers per piece in arrays (its id's bytes and about 60 bytes),
    no Python object per piece or per source."""
    summary = Summary(cache)
    # Pass 1, in source order: the report, and each piece's row: its source, where its notes
    # are now (its source's staged file: location -1, or a shard of the last pack: the shard's
    # number in `files`), and what the index needs.
    first = array("q", [0])  # the rows of source i are first[i] .. first[i+1]
    id_bytes, id_end = bytearray(), array("q", [0])
    index_in_source, location, offset, count, steps = (array("q") for _ in range(5))
    linked: list[tuple[str, str]] = []  # (piece id, the parent work its file states)
    files: dict[str, int] = {}  # the shards of the last pack that hold some of these pieces
    for i, k in enumerate(keys):
        r = unreadable[i] if not k else done[k.decode()]
        summary.add(r)
        for p in r["pieces"]:
            id_bytes += p["piece_id"].encode()
            id_end.append(len(id_bytes))
            index_in_source.append(p["index"])
            location.append(-1 if p["file"].startswith("staging/") else files.setdefault(p["file"], len(files)))
            offset.append(p["offset"])
            count.append(p["count"])
            steps.append(p["steps"])
            if p.get("parent_work"):
                linked.append((p["piece_id"], p["parent_work"]))
        first.append(len(id_end) - 1)
    first_row = np.frombuffer(first, np.int64)
    ids = _fixed_width(id_bytes, np.frombuffer(id_end, np.int64))  # (P,) the index's column, built once
    width = ids.dtype.itemsize
    del id_bytes, id_end
    source = np.repeat(np.arange(len(keys)), np.diff(first_row))  # (P,) the source of each row
    shard = np.array([_shard_of(k.decode()) if k else 0 for k in keys], dtype=np.int64)[source]
    order = np.argsort(ids, kind="stable")  # (P,) rows by piece id (bytes sort as str)
    offset, count = np.frombuffer(offset, np.int64).copy(), np.frombuffer(count, np.int64)
    location, file_names = np.frombuffer(location, np.int64).copy(), list(files)
    index_in_source = np.frombuffer(index_in_source, np.int64)

    def notes_file(row: int) -> str:
        loc = int(location[row])
        return file_names[loc] if loc >= 0 else f"staging/{keys[source[row]].decode()}.npy"

    shards: list[str | None] = []
    staged = bool((location < 0).any())
    for n in tqdm(range(NUM_SHARDS), desc="pack", unit="shard", disable=not progress or not staged):
        group = order[shard[order] == n]  # this shard's rows, by piece id
        if not len(group):
            shards.append(None)
            continue
        # Named by what it holds (key = content + settings): an unchanged shard keeps its file.
        digest = hashlib.sha1()
        for j, i in enumerate(group.tolist()):  # the rows' "key-index" lines, joined by newlines
            digest.update(("\n" if j else "").encode() + keys[source[i]] + f"-{index_in_source[i]}".encode())
        name = f"notes/{n:02d}-{digest.hexdigest()[:16]}.npy"
        if not (cache / name).exists():
            _save_notes(cache / name, _notes(cache, map(notes_file, group.tolist()), offset[group], count[group]),
                        total=int(count[group].sum()))
        shards.append(name)
        location[group] = files.setdefault(name, len(files))
        file_names = list(files)
        offset[group] = np.cumsum(count[group]) - count[group]
    groups = work_groups(linked)

    def work(piece_id: str) -> str:
        k = work_key(piece_id)
        return groups.get(k, k)

    # The index, in piece id order, column by column (the ids last: they are the biggest).
    index = np.zeros(len(ids), _index_dtype(width))
    index["shard"], index["offset"], index["count"] = shard[order], offset[order], count[order]
    index["steps"] = np.frombuffer(steps, np.int64)[order]
    index["piece_id"] = ids[order]
    del ids
    index["split"] = np.fromiter((split_hash(work(i.decode())) for i in index["piece_id"]), np.float64, len(index))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(index))
    raw = index.view(np.uint8)  # (P * row bytes,) the rows as written, without a copy
    digest = hashlib.sha1(header.getvalue())
    digest.update(raw)
    index_name = f"index-{digest.hexdigest()[:16]}.npy"

    def write_index(tmp: Path) -> None:
        with tmp.open("wb") as f:
            f.write(header.getvalue())
            f.write(raw)

    # Unless it holds these bytes already: a damaged index of this name is mended by preparing again.
    atomic_write(cache / index_name, write_index, keep_same=True)
    del index, raw

    def placed(i: int) -> dict[str, Any]:
        """The record of source i, its pieces saying where the pack put their notes."""
        r = done[keys[i].decode()]
        for row, p in enumerate(r["pieces"], int(first_row[i])):
            p["file"], p["offset"], p["work"] = file_names[location[row]], int(offset[row]), work(p["piece_id"])
        return r

    def records() -> Iterator[str]:
        for i in np.argsort(keys, kind="stable").tolist():
            if keys[i]:
                yield json.dumps(placed(i), sort_keys=True, ensure_ascii=False) + "\n"

    def pieces() -> Iterator[str]:
        last = None
        for row in order.tolist():  # a source's pieces are mostly neighbours here: each record is read once
            i = int(source[row])
            if last != i:
                last, held = i, placed(i)["pieces"]
            yield json.dumps(held[row - int(first_row[i])], sort_keys=True, ensure_ascii=False) + "\n"

    _write_if_changed(cache / "done.jsonl", records())
    _write_if_changed(cache / "pieces.jsonl", pieces())
    _write_if_changed(cache / "report.txt", [l + "\n" for l in summary.report] + [summary.line() + "\n"])
    _write_if_changed(cache / "settings.json", [json.dumps(asdict(settings), sort_keys=True, indent=1) + "\n"])
    _write_if_changed(cache / "index.json", [json.dumps({"format": FORMAT, "index": index_name, "shards": shards}, indent=1) + "\n"])
    # Committed: the records are in done.jsonl, the notes in the shards; the rest is leftovers.
    keep = {index_name, *filter(None, shards)}
    # Entry by entry: a list of Paths of a fresh 100k-file cache's done/ and staging/ held 100 MB.
    for folder, pattern in (("done", "*.json"), ("staging", "*"), ("notes", "*"), ("", "index-*.npy")):
        with os.scandir(cache / folder) as entries:
            for e in entries:
                if fnmatch.fnmatch(e.name, pattern) and posixpath.join(folder, e.name) not in keep:
                    os.unlink(e.path)
    return summary


def _notes(cache: Path, files: Iterable[str], offset: np.ndarray, count: np.ndarray) -> Iterator[np.ndarray]:
    """The notes of pieces, one array each, read from the files where they are now (a few kept open:
    pieces come file by file)."""
    open_files: dict[str, np.ndarray] = {}
    for f, o, c in zip(files, offset.tolist(), count.tolist()):
        if f not in open_files:
            if len(open_files) > 32:
                open_files.clear()
            open_files[f] = np.load(cache / f, mmap_mode="r")
        yield open_files[f][o:o + c]


def _index_dtype(width: int) -> np.dtype:
    return np.dtype([("piece_id", f"S{width}"), ("shard", "<u2"), ("offset", "<u8"), ("count", "<u4"),
                     ("steps", "<u4"), ("split", "<f8")])


def _write_if_changed(path: Path, lines: Iterable[str]) -> None:
    """Write `lines` to `path` unless it holds exactly them already: a second run over finished
    inputs then touches nothing at all. Streamed: memory holds one line at a time."""
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(lines)

    atomic_write(path, write, keep_same=True)


# ----------------------------------------------------------------------------- reading a cache


# What a note cache's folder holds, and nothing else: `prepare` writes, replaces and clears these.
CACHE_ENTRIES = {"notes", "staging", "done", "inflight", "done.jsonl", "index.json", "pieces.jsonl", "report.txt",
                 "settings.json"}


def check_cache_folder(cache_dir: str | os.PathLike) -> None:
    """BadInput when `cache_dir` exists and holds anything a cache does not: `prepare` clears
    its sub-folders, so a folder of the user's own files given by mistake must be refused."""
    cache = Path(cache_dir)
    if cache.exists() and not cache.is_dir():
        raise BadInput(f"--cache-dir {cache} is a file; give a new or empty folder, or a midi-rae cache")
    if not cache.is_dir():
        return
    entries = sorted(os.listdir(cache))
    foreign = [e for e in entries if e not in CACHE_ENTRIES and not re.fullmatch(r"index-[0-9a-f]+\.npy|\..*\.tmp", e)]
    # A cache has its settings, or (a first prepare killed early) at least its four sub-folders.
    started = (cache / "settings.json").is_file() or all((cache / d).is_dir() for d in ("notes", "staging", "done", "inflight"))
    if foreign or (not started and entries):
        foreign = foreign or entries
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise BadInput(f"--cache-dir {cache} is not a midi-rae cache (it holds {shown}); give a new or empty folder, "
                       f"or the folder of a cache to update")


def is_dense(cache_dir: str | os.PathLike) -> bool:
    """Whether `cache_dir` holds a dense roll cache of an earlier version (`rolls/`, no `index.json`)."""
    return (Path(cache_dir) / "rolls").is_dir() and not (Path(cache_dir) / "index.json").exists()


def load_settings(cache_dir: str | os.PathLike) -> RollSettings:
    """The `RollSettings` a cache was prepared with."""
    path = Path(cache_dir) / "settings.json"
    if not path.is_file():
        raise FileNotFoundError(f"no prepared roll cache at {cache_dir}: run `midi-rae prepare` for it, or point "
                                f"--cache-dir (or MIDI_RAE_CACHE, data.cache_dir) at the cache the run used")
    try:
        values = json.loads(path.read_text())
        if not isinstance(values, dict):
            raise ValueError(f"not a mapping: {values!r}")
        return RollSettings(**values)
    except (ValueError, TypeError) as e:  # TypeError: a field RollSettings does not have
        raise ValueError(f"{path} is damaged ({e}); run `midi-rae prepare --cache-dir {cache_dir}` again with the "
                         f"inputs it was made of") from None


def load_index(cache_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The pieces of a prepared cache with their metadata (one dict per `pieces.jsonl` line).

    Keys: piece_id, file, offset, count (where its notes are; a dense cache of an earlier version
    has `roll` instead), source, index, steps, notes, collection, composer, title,
    time_signature, key, format, work (what the split groups; see `piece_work`), parent_work
    (where the file names the work it is part of) and tune_id for ABC tunes.
    """
    path = Path(cache_dir) / "pieces.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `midi-rae prepare` first (or pass the cache dir it printed)")
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def cache_identity(cache_dir: str | os.PathLike) -> str:
    """What a result scored on a cache is matched on: the name of its index (the digest of every
    piece's id, place, length and split; `prepare` of other inputs, or a new split, changes it),
    or for a dense cache of an earlier version the digest of its `pieces.jsonl`."""
    manifest = Path(cache_dir) / "index.json"
    if manifest.exists():
        return json.loads(manifest.read_text())["index"]
    return "pieces-" + hashlib.sha1((Path(cache_dir) / "pieces.jsonl").read_bytes()).hexdigest()[:16]


def piece_collections(cache_dir: str | os.PathLike) -> dict[str, str]:
    """piece id -> its collection, "unknown" where the cache names none (files given directly)."""
    return {p["piece_id"]: p.get("collection") or "unknown" for p in load_index(cache_dir)}


def load_notes(cache_dir: str | os.PathLike, piece: dict[str, Any]) -> np.ndarray:
    """The notes of one piece of a note cache, `(N,)` NOTE_DTYPE sorted by start (memory-mapped)."""
    return map_notes(cache_dir, piece["file"])[piece["offset"]:piece["offset"] + piece["count"]]


def map_notes(cache_dir: str | os.PathLike, file: str) -> np.ndarray:
    """The notes file `file` (a shard) of a note cache, memory-mapped; a missing or damaged one is a
    ValueError naming the commands that rebuild the cache (numpy's own message names no fix, and
    for a damaged header suggests loading pickles). The staged notes are gone once packed, and
    `prepare` keeps the shards of finished sources: the folder must go before they convert again."""
    try:
        # A plain array over the mapping: slicing a np.memmap runs its Python-level __getitem__ and
        # __array_finalize__, about a third of the time a training crop took to read and render.
        return np.load(Path(cache_dir) / file, mmap_mode="r").view(np.ndarray)
    except (FileNotFoundError, EOFError, ValueError):  # missing, empty, not an .npy, or cut short
        raise ValueError(f"{cache_dir} is damaged: its notes file {file} is missing or not a whole notes array; "
                         f"delete {cache_dir}, then run `midi-rae prepare --cache-dir {cache_dir}` with the inputs it "
                         f"was made of") from None


def load_roll(cache_dir: str | os.PathLike, piece: dict[str, Any], mmap: bool = True) -> np.ndarray:
    """The `(C, 128, T)` uint8 roll of one piece (`load_index`'s dict): painted from its notes, or
    read from a dense cache of an earlier version (memory-mapped unless `mmap=False`)."""
    if "roll" in piece:
        return np.load(Path(cache_dir) / "rolls" / piece["roll"], mmap_mode="r" if mmap else None)
    return render(load_notes(cache_dir, piece), piece["steps"], load_settings(cache_dir))


class CachedPiece:
    """One piece of a cache, for crops: its length, where it sounds, and windows of its roll."""

    def __init__(self, steps: int, settings: RollSettings, notes: np.ndarray | None = None, roll: np.ndarray | None = None) -> None:
        self.steps, self.settings, self.notes, self.roll = steps, settings, notes, roll

    def sounding(self) -> np.ndarray:
        """(T,) bool: columns where a note sounds."""
        return self.roll[0].any(axis=0) if self.roll is not None else sounding(self.notes, self.steps)

    def window(self, start: int, width: int, pitch_shift: int = 0, channels: int | None = None) -> np.ndarray:
        """(C, 128, width) uint8: columns `start .. start+width`, moved up `pitch_shift` semitones, zero-filled."""
        if self.roll is not None:
            return crop(self.roll, start, width, pitch_shift)[:channels]
        return render(self.notes, self.steps, self.settings, start, width, pitch_shift, channels)


class CacheReader:
    """Random access to the pieces of a prepared cache by row (piece id order).

    What it holds per piece is numpy columns of the memory-mapped index (`piece_id`, `steps`,
    `split`, and where the notes are), so every loader worker shares one copy through the page
    cache and start-up costs no Python object per piece. Every shard is mapped when the reader is
    made (again in a spawned loader worker), so that a damaged one is refused at once. A dense cache
    of an earlier version is read too (its index built from pieces.jsonl).
    """

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.cache_dir = Path(cache_dir)
        self.settings = load_settings(cache_dir)
        manifest = self.cache_dir / "index.json"
        rebuild = f"run `midi-rae prepare --cache-dir {cache_dir}` again with the inputs it was made of"
        if manifest.exists():
            try:
                m = json.loads(manifest.read_text())
                fmt = m.get("format")
            except (ValueError, AttributeError) as e:  # not JSON, or not a JSON object
                raise ValueError(f"{cache_dir} is damaged: its index does not read ({e}); {rebuild}") from None
            if fmt != FORMAT:
                raise ValueError(f"{cache_dir} is a cache of format {fmt!r}, this version reads {FORMAT!r}: "
                                 f"rebuild it with `midi-rae prepare --cache-dir {cache_dir}` (and the inputs it was made of)")
            try:
                self.index = np.load(self.cache_dir / m["index"], mmap_mode="r").view(np.ndarray)  # see map_notes
                shard_files, self._rolls = dict(enumerate(m["shards"])), None  # shard number -> file (None: empty)
            except (ValueError, KeyError, TypeError, EOFError, FileNotFoundError) as e:  # EOFError: an empty file
                raise ValueError(f"{cache_dir} is damaged: its index does not read ({e}); {rebuild}") from None
            # Mapped now, not on first use: a damaged shard is refused before a run writes anything.
            self._shards = {i: map_notes(cache_dir, f) for i, f in shard_files.items() if f}
        elif not is_dense(cache_dir):
            raise ValueError(f"{cache_dir} is damaged or unfinished: index.json is missing; {rebuild}")
        else:  # a dense cache of an earlier version
            pieces = load_index(cache_dir)
            width = max([len(p["piece_id"].encode()) for p in pieces], default=1)
            self.index = np.zeros(len(pieces), _index_dtype(width))
            self.index["piece_id"] = [p["piece_id"].encode() for p in pieces]
            self.index["steps"] = [p["steps"] for p in pieces]
            self.index["split"] = [split_hash(piece_work(p)) for p in pieces]
            self._shards, self._rolls = {}, np.array([p["roll"] for p in pieces])

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict[str, Any]:  # a spawned loader worker maps the files itself
        return {"cache_dir": self.cache_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["cache_dir"])

    def piece_id(self, row: int) -> str:
        return bytes(self.index["piece_id"][row]).decode()

    def piece(self, row: int) -> CachedPiece:
        r = self.index[row]
        if self._rolls is not None:
            return CachedPiece(int(r["steps"]), self.settings, roll=np.load(self.cache_dir / "rolls" / self._rolls[row], mmap_mode="r"))
        offset, notes = int(r["offset"]), self._shards[int(r["shard"])]
        return CachedPiece(int(r["steps"]), self.settings, notes=notes[offset:offset + int(r["count"])])


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


_MOVEMENT = re.compile(r"(movement|mvmt|mvt|mov)[ _.-]*\d+.*")  # a file of one movement, in its work's folder
_SECTION = re.compile(r"(?<=\d)[-_][a-z]{1,3}$")  # a section letter or variant after a number: credo_03_a, bwv18.5-lz


def work_key(piece_id: str) -> str:
    """The work a piece id names by its path, whatever file format holds it: the source path
    without its music-file suffix, lower-cased (`music21/bach/bwv277.krn` and `.mxl` are one
    work); a section letter or variant suffix after a number dropped (`Credo_03_a` and
    `Credo_03_b`, `bwv18.5-lz` and `bwv18.5-w`); a movement file (`opus18no1/movement4`) named by
    its folder, the work; a piece of a multi-piece file (a tune of an ABC book) is the file's path
    plus `#<index>`, as it is.
    A stated parent work joins more (`work_groups`)."""
    source, sep, index = piece_id.partition("#")
    stem, dot, suffix = source.rpartition(".")
    if dot and f".{suffix.lower()}" in SUFFIXES:
        source = stem
    folder, _, name = source.lower().rpartition("/")
    if sep:  # a tune of a multi-piece file is its own work (oneills1850's 0732-0758_bs and _mh hold other tunes)
        return posixpath.join(folder, name) + sep + index
    if _MOVEMENT.fullmatch(name) and folder:
        return folder
    return posixpath.join(folder, _SECTION.sub("", name))


def parent_work_key(piece_id: str, parent_work: str) -> str:
    """The key of a parent work a file states (a mass its Kyrie .. Agnus files name), in the
    piece's folder: `music21/palestrina/missa alma redemptoris mater`."""
    folder = piece_id.partition("#")[0].lower().rpartition("/")[0]
    return posixpath.join(folder, " ".join(parent_work.lower().split()))


def work_groups(pieces: Iterable[tuple[str, str | None]]) -> dict[str, str]:
    """Path work key -> the work it belongs to, for `(piece_id, parent_work)` pairs: the path keys
    and stated parent works that any piece links are one work (the sections of a mass; a chorale
    stored as .krn, which names its collection as parent, and as .mxl, which names none), named by
    its smallest key. Keys no piece links map to themselves."""
    root: dict[str, str] = {}

    def find(k: str) -> str:
        while root.setdefault(k, k) != k:
            root[k] = root[root[k]]  # path halving
            k = root[k]
        return k

    for piece_id, parent in pieces:
        if parent:
            a, b = find(work_key(piece_id)), find(parent_work_key(piece_id, parent))
            if a != b:
                root[max(a, b)] = min(a, b)
    return {k: find(k) for k in list(root)}


def split_hash(work: str) -> float:
    """The hash of a work key (or of a piece id's `work_key`) as a number in [0, 1): the index's
    `split` column."""
    return int.from_bytes(hashlib.sha1(work_key(work).encode()).digest()[:8], "big") / 2**64


def split_of(work: str, val_fraction: float = 0.05) -> str:
    """'train' or 'val' from a hash of the work (a piece's `work` in `pieces.jsonl`, or a piece id,
    then its path `work_key`): the same on every machine, for any file order, and the same for
    every piece of one work (no work on both sides)."""
    return "val" if split_hash(work) < val_fraction else "train"


def piece_work(piece: dict[str, Any]) -> str:
    """The work of a `pieces.jsonl` row: its `work` field (a cache of an earlier version has
    none: its path `work_key`)."""
    return piece.get("work") or work_key(piece["piece_id"])
