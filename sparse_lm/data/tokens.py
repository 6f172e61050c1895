"""A split's documents as one token stream, cached on disk so each split is tokenised only once."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Protocol

import numpy as np
from jaxtyping import Int
from tqdm import tqdm

from sparse_lm.data.config import DataConfig, resolve_cache_dir
from sparse_lm.data.corpora import Document, corpus_fingerprint, load_split
from sparse_lm.utils.io import atomic_write_bytes

# Legend: T tokens in the stream.

log = logging.getLogger(__name__)

# Bump when the layout of the cached stream changes (separator, dtype, order).
CACHE_FORMAT_VERSION = 1
# Documents per encode_batch call: enough to batch, few enough to keep the progress bar moving.
ENCODE_CHUNK = 32


class TokenizerLike(Protocol):
    """What this module needs from a tokenizer (sparse_lm.data.tokenizer.Tokenizer provides it)."""

    eos_token_id: int
    fingerprint: str

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


def cache_key(cfg: DataConfig, tokenizer: TokenizerLike) -> str:
    """sha256 over everything the token stream depends on; the source is read to fingerprint it."""
    fields = {
        "format": CACHE_FORMAT_VERSION,
        "corpus_fingerprint": corpus_fingerprint(cfg),
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "eos_token_id": int(tokenizer.eos_token_id),
        # Optional attributes of sparse_lm.data.tokenizer.Tokenizer that change encodings but not the
        # vocabulary fingerprint.
        "add_bos": bool(getattr(tokenizer, "add_bos", False)),
        "bos_token_id": getattr(tokenizer, "bos_token_id", None),
        "corpus": cfg.corpus.value,
        "split": cfg.split.value,
        "validation_fraction": cfg.validation_fraction,
        "test_fraction": cfg.test_fraction,
        "split_seed": cfg.split_seed,
        "max_documents": cfg.max_documents,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def cache_path(cfg: DataConfig, tokenizer: TokenizerLike) -> Path:
    """Where `split_tokens` keeps the stream: <cache_dir>/tokens/<corpus>-<split>-<key[:20]>.npy."""
    name = f"{cfg.corpus.value}-{cfg.split.value}-{cache_key(cfg, tokenizer)[:20]}.npy"
    return resolve_cache_dir(cfg.cache_dir) / "tokens" / name


def tokenize_documents(
    documents: list[Document], tokenizer: TokenizerLike, *, progress: bool = True
) -> Int[np.ndarray, " T"]:
    """Each document's tokens followed by `tokenizer.eos_token_id`, concatenated into one int32 stream.

    The EOS after every document (the last one included) is the document separator: a packed sequence that
    spans two documents sees where one ends.
    """
    eos = int(tokenizer.eos_token_id)
    pieces: list[np.ndarray] = []
    with tqdm(total=len(documents), desc="tokenising", unit="doc", disable=not progress) as bar:
        for start in range(0, len(documents), ENCODE_CHUNK):
            chunk = documents[start : start + ENCODE_CHUNK]
            encoded = tokenizer.encode_batch([doc.text for doc in chunk])
            if len(encoded) != len(chunk):
                raise ValueError(f"encode_batch returned {len(encoded)} encodings for {len(chunk)} texts")
            for ids in encoded:
                pieces.append(np.asarray(ids, dtype=np.int64))
                pieces.append(np.array([eos], dtype=np.int64))
            bar.update(len(chunk))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if stream.size and (stream.min() < 0 or stream.max() > np.iinfo(np.int32).max):
        raise ValueError(f"token ids must lie in [0, 2**31), got [{stream.min()}, {stream.max()}]")
    return stream.astype(np.int32)


def _read_cache(path: Path) -> np.ndarray | None:
    """The cached stream, or None when the file is missing or unusable (a torn or foreign file is rebuilt)."""
    if not path.exists():
        return None
    try:
        tokens = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        log.warning("token cache %s is unreadable (%s); rebuilding it", path, err)
        return None
    if not isinstance(tokens, np.ndarray) or tokens.dtype != np.int32 or tokens.ndim != 1 or tokens.size == 0:
        log.warning("token cache %s holds %r, not a 1-D int32 stream; rebuilding it", path, tokens)
        return None
    return tokens


def split_tokens(
    cfg: DataConfig, tokenizer: TokenizerLike, *, progress: bool = True
) -> Int[np.ndarray, " T"]:
    """The documents of `cfg.split`, tokenised and concatenated, each followed by the EOS separator.

    The stream is cached as .npy under the cache folder (see `cache_path`), keyed by the corpus contents, the
    tokenizer fingerprint and the split settings; later calls load it without tokenising. A cache file
    that cannot be read back as a 1-D int32 array is rebuilt.

    Args:
      cfg: corpus, split and cache settings.
      tokenizer: anything with `encode_batch`, `eos_token_id` and `fingerprint`.
      progress: show a tqdm bar while tokenising.

    Returns:
      int32 token ids, shape [T].
    """
    path = cache_path(cfg, tokenizer)
    tokens = _read_cache(path)
    if tokens is not None:
        return tokens
    tokens = tokenize_documents(load_split(cfg), tokenizer, progress=progress)
    buffer = io.BytesIO()
    np.save(buffer, tokens, allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())
    return tokens
