"""Byte-level BPE tokenizer rebuilt with `tokenizers` from the vocabulary and merges stored in a GGUF file."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

# llama.cpp token types (gguf.TokenType): 3 is CONTROL (special tokens such as <|im_start|>).
_CONTROL = 3


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer`; `fingerprint` identifies the vocabulary for caches."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int,
        fingerprint: str,
        add_bos: bool = False,
    ):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.fingerprint = fingerprint
        self.add_bos = add_bos

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if self.add_bos and self.bos_token_id is not None else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        prefix = [self.bos_token_id] if self.add_bos and self.bos_token_id is not None else []
        return [prefix + e.ids for e in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


def build_bpe_tokenizer(
    tokens: Sequence[str],
    merges: Sequence[str],
    token_types: Sequence[int],
    *,
    pre: str,
    bos_token_id: int | None,
    eos_token_id: int,
    add_bos: bool = False,
) -> Tokenizer:
    """A GPT-2 style byte-level BPE from GGUF metadata (`tokenizer.ggml.*`).

    Args:
      pre: llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`). "smollm" splits digits one by one before
        the GPT-2 regex, like the Hugging Face tokenizer of SmolLM/SmolLM2; "gpt2"/"default" do not.
    """
    if pre not in ("smollm", "gpt2", "default"):
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: smollm, gpt2, default")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens")
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ValueError(f"malformed BPE merge {merge!r} in GGUF metadata")
        pairs.append((left, right))
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    specials = [
        tokenizers.AddedToken(tok, special=True, normalized=False)
        for tok, kind in zip(tokens, token_types, strict=True)
        if kind == _CONTROL
    ]
    backend.add_special_tokens(specials)
    digest = hashlib.sha256()
    for part in (pre, "\n".join(tokens), "\n".join(merges), ",".join(map(str, token_types))):
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    return Tokenizer(
        backend, bos_token_id=bos_token_id, eos_token_id=eos_token_id, fingerprint=digest.hexdigest()[:16],
        add_bos=add_bos,
    )


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 and EOS = 256: a vocabulary-free tokenizer for tiny test models."""

    def __init__(self):
        self.bos_token_id = None
        self.eos_token_id = 256
        self.fingerprint = "bytes-v1"
        self.add_bos = False

    @property
    def vocab_size(self) -> int:
        return 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def tokenizer_to_json(tokenizer: Tokenizer) -> dict:
    """Everything needed to rebuild `tokenizer` exactly (see `tokenizer_from_json`)."""
    if isinstance(tokenizer, ByteTokenizer):
        return {"kind": "bytes"}
    return {
        "kind": "bpe",
        "backend": tokenizer.backend.to_str(),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "add_bos": tokenizer.add_bos,
        "fingerprint": tokenizer.fingerprint,
    }


def tokenizer_from_json(record: dict) -> Tokenizer:
    """The tokenizer saved by `tokenizer_to_json`."""
    kind = record.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind != "bpe":
        raise ValueError(f"saved tokenizer has unknown kind {kind!r} (expected bpe or bytes)")
    return Tokenizer(
        tokenizers.Tokenizer.from_str(record["backend"]),
        bos_token_id=record["bos_token_id"],
        eos_token_id=record["eos_token_id"],
        fingerprint=record["fingerprint"],
        add_bos=record["add_bos"],
    )
