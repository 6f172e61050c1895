"""Corpora, deterministic splits, cached token streams and packing (the tokenizer lives in `tokenizer.py`)."""

from sparse_lm.data.config import Corpus, DataConfig, Split, resolve_cache_dir
from sparse_lm.data.corpora import (
    CorpusNotFoundError,
    Document,
    EmptyCorpusError,
    assign_splits,
    corpus_fingerprint,
    load_documents,
    load_split,
    source_path,
    split_documents,
)
from sparse_lm.data.packing import PackedSequences, batch_iterator, num_batches, pack_sequences
from sparse_lm.data.tokens import cache_path, split_tokens, tokenize_documents

__all__ = [
    "Corpus",
    "CorpusNotFoundError",
    "DataConfig",
    "Document",
    "EmptyCorpusError",
    "PackedSequences",
    "Split",
    "assign_splits",
    "batch_iterator",
    "cache_path",
    "corpus_fingerprint",
    "load_documents",
    "load_split",
    "num_batches",
    "pack_sequences",
    "resolve_cache_dir",
    "source_path",
    "split_documents",
    "split_tokens",
    "tokenize_documents",
]
