"""A byte-level stand-in for sparse_lm.data.tokenizer.Tokenizer: ids are UTF-8 bytes, EOS is 256."""

from __future__ import annotations


class ByteTokenizer:
    """Same interface as the GGUF tokenizer; counts encode calls so tests can see cache hits."""

    eos_token_id = 256

    def __init__(self, fingerprint: str = "bytes-v1"):
        self.fingerprint = fingerprint
        self.encoded_texts = 0

    def encode(self, text: str) -> list[int]:
        self.encoded_texts += 1
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]
