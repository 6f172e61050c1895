"""Training a small byte-level BPE vocabulary on the corpus with `tokenizers` (for from-scratch models)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from sparse_lm.data.config import DataConfig, resolve_cache_dir
from sparse_lm.data.corpora import corpus_fingerprint, load_split
from sparse_lm.data.tokenizer import Tokenizer, tokenizer_from_json, tokenizer_to_json
from sparse_lm.utils.io import atomic_write_json

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"  # id 0: the document separator


def train_bpe(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """A GPT-2 style byte-level BPE with `vocab_size` ids (EOS is id 0) learned from `texts`."""
    if vocab_size < 257 + 1:
        raise ValueError(f"tokenizer.vocab_size must exceed the 256 byte symbols + EOS, got {vocab_size}")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer, length=len(texts))
    fingerprint = "bpe-" + hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()[:16]
    return Tokenizer(backend, bos_token_id=None, eos_token_id=backend.token_to_id(EOS), fingerprint=fingerprint)


def corpus_tokenizer(corpora: Sequence[DataConfig], vocab_size: int) -> Tokenizer:
    """A BPE trained on the documents of `corpora` (their configured splits), cached by corpus contents.

    The cache lives under the first corpus's cache folder, keyed by every corpus fingerprint, split
    setting and the vocabulary size, so the runs of a sweep share one tokenizer.
    """
    key = hashlib.sha256(
        json.dumps(
            [[corpus_fingerprint(c), c.split.value, c.split_seed, c.validation_fraction, c.test_fraction,
              c.max_documents] for c in corpora] + [vocab_size]
        ).encode("utf-8")
    ).hexdigest()[:16]
    path = resolve_cache_dir(corpora[0].cache_dir) / "tokenizers" / f"bpe{vocab_size}-{key}.json"
    if path.exists():
        try:
            return tokenizer_from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            log.warning("cached tokenizer %s is unreadable (%s); training it again", path, e)
    texts = [doc.text for c in corpora for doc in load_split(c)]
    tokenizer = train_bpe(texts, vocab_size)
    atomic_write_json(path, tokenizer_to_json(tokenizer))
    return tokenizer
