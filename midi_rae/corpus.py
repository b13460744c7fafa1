"""The music corpus inside the installed `music21` wheel: the default data set, no downloads.

It holds the Bach chorales (MusicXML), the Essen folk-song collection (about 8,500 ABC tunes,
many per file), Palestrina's masses (kern), Monteverdi's madrigals, several fiddle-tune books
(ABC) and single works of other composers. Rolls are always derived on the user's machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from midi_rae.roll import SUFFIXES

# Corpus folders that are not repertoire: music21's test and teaching files, its metadata.
EXCLUDED_DIRS = frozenset({"demos", "theoryExercises", "_metadataCache", "__pycache__"})

# Top-level folder -> composer; folders missing here are anonymous collections (folk tunes).
COMPOSERS: dict[str, str] = {
    "bach": "Johann Sebastian Bach",
    "beach": "Amy Beach",
    "beethoven": "Ludwig van Beethoven",
    "chopin": "Frédéric Chopin",
    "ciconia": "Johannes Ciconia",
    "corelli": "Arcangelo Corelli",
    "cpebach": "Carl Philipp Emanuel Bach",
    "handel": "George Frideric Handel",
    "haydn": "Joseph Haydn",
    "johnson_j_r": "J. Rosamond Johnson",
    "joplin": "Scott Joplin",
    "josquin": "Josquin des Prez",
    "liliuokalani": "Liliuokalani",
    "luca": "Gregorio Luca",
    "lusitano": "Vicente Lusitano",
    "monteverdi": "Claudio Monteverdi",
    "mozart": "Wolfgang Amadeus Mozart",
    "palestrina": "Giovanni Pierluigi da Palestrina",
    "schoenberg": "Arnold Schoenberg",
    "schubert": "Franz Schubert",
    "schumann_clara": "Clara Schumann",
    "schumann_robert": "Robert Schumann",
    "verdi": "Giuseppe Verdi",
    "weber": "Carl Maria von Weber",
    "webern": "Anton Webern",
}


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    source_id: str  # "music21/<path inside the corpus>": the same on every machine
    collection: str  # top-level corpus folder, e.g. "bach", "essenFolksong"
    composer: str | None


def corpus_root() -> Path:
    """The `corpus` folder of the installed music21 package."""
    import music21

    return Path(music21.__file__).parent / "corpus"


def corpus_files(collections: list[str] | None = None) -> list[CorpusFile]:
    """Every readable score of the bundled corpus, sorted by source id.

    `collections` restricts to some top-level folders (e.g. `["bach", "essenFolksong"]`).
    """
    root = corpus_root()
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or path.suffix.lower() not in SUFFIXES or len(rel.parts) < 2:
            continue
        collection = rel.parts[0]
        if collection in EXCLUDED_DIRS or (collections is not None and collection not in collections):
            continue
        files.append(CorpusFile(path, f"music21/{rel.as_posix()}", collection, COMPOSERS.get(collection)))
    return files
