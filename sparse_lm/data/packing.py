"""Packing a token stream into fixed-length rows, and deterministic, resumable batches of them."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np
from jaxtyping import Bool, Int

# Legend: T tokens in the stream, N packed rows, B rows per batch, L sequence length.


@dataclasses.dataclass(frozen=True)
class PackedSequences:
    """Rows of tokens and which of them are real (False marks padding after the end of the stream)."""

    tokens: Int[np.ndarray, "N L"]  # int32
    mask: Bool[np.ndarray, "N L"]

    def __post_init__(self):
        if self.tokens.ndim != 2 or self.tokens.shape != self.mask.shape:
            raise ValueError(f"tokens {self.tokens.shape} and mask {self.mask.shape} must be the same [N, L]")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]


def pack_sequences(
    tokens: Int[np.ndarray, " T"], seq_len: int, *, drop_remainder: bool = True, pad_id: int = 0
) -> PackedSequences:
    """Cuts a token stream into consecutive, non-overlapping rows of `seq_len` tokens.

    A model predicting next tokens within a row makes seq_len - 1 predictions per row.

    Args:
      tokens: int token ids, shape [T], e.g. from `split_tokens` (documents already end in EOS).
      seq_len: L, tokens per row.
      drop_remainder: drop the last T mod L tokens (mask all True); if False, pad them to a last row
        with `pad_id` and mark the padding False in the mask.
      pad_id: filler id for padding; masked out, so any valid id will do.

    Returns:
      PackedSequences with tokens int32 [N, L] and mask bool [N, L]; N = T // L, or ceil(T / L) when
      drop_remainder is False.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int | np.integer) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, got {tokens.dtype} of shape {tokens.shape}")
    if tokens.size == 0:
        raise ValueError(f"tokens is empty: nothing to pack into rows of seq_len={seq_len}")
    if drop_remainder:
        rows = tokens.size // seq_len
        if rows == 0:
            raise ValueError(
                f"only {tokens.size} tokens, fewer than seq_len={seq_len}; pass drop_remainder=False to pad"
            )
        packed = tokens[: rows * seq_len].astype(np.int32).reshape(rows, seq_len)
        return PackedSequences(packed, np.ones(packed.shape, dtype=bool))
    rows = math.ceil(tokens.size / seq_len)
    packed = np.full(rows * seq_len, pad_id, dtype=np.int32)
    packed[: tokens.size] = tokens
    mask = np.arange(rows * seq_len) < tokens.size
    return PackedSequences(packed.reshape(rows, seq_len), mask.reshape(rows, seq_len))


def num_batches(num_sequences: int, batch_size: int, *, drop_remainder: bool = True) -> int:
    """Batches in one epoch over `num_sequences` rows."""
    if drop_remainder:
        return num_sequences // batch_size
    return math.ceil(num_sequences / batch_size)


def batch_iterator(
    packed: PackedSequences,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    start_batch: int = 0,
    num_epochs: int | None = 1,
    drop_remainder: bool = True,
) -> Iterator[PackedSequences]:
    """Yields batches of rows [B, L], the same sequence for the same arguments.

    Batches are numbered 0, 1, ... across epochs; batch b comes from epoch b // num_batches, and with
    `shuffle` each epoch visits the rows in its own permutation drawn from (seed, epoch). Passing
    `start_batch=b` yields exactly what the full iterator yields from batch b on, so a resumed run continues
    at its data position.

    Args:
      packed: rows from `pack_sequences`.
      batch_size: B, rows per batch.
      shuffle: permute the rows in every epoch (else rows come in order).
      seed: non-negative seed of the permutations.
      start_batch: index of the first batch to yield.
      num_epochs: epochs to run; None repeats forever.
      drop_remainder: skip each epoch's last incomplete batch (else it is yielded smaller, with N mod B rows).

    Raises:
      ValueError: a bad argument, or no complete batch fits in one epoch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(start_batch, int) or start_batch < 0:
        raise ValueError(f"start_batch must be a non-negative integer, got {start_batch!r}")
    if num_epochs is not None and num_epochs < 0:
        raise ValueError(f"num_epochs must be >= 0 or None, got {num_epochs!r}")
    per_epoch = num_batches(len(packed), batch_size, drop_remainder=drop_remainder)
    if per_epoch == 0:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {len(packed)} packed sequences; "
            "lower batch_size or pass drop_remainder=False"
        )
    total = None if num_epochs is None else num_epochs * per_epoch
    return _batches(packed, batch_size, shuffle, seed, start_batch, total, per_epoch)


def _batches(
    packed: PackedSequences,
    batch_size: int,
    shuffle: bool,
    seed: int,
    start_batch: int,
    total: int | None,
    per_epoch: int,
) -> Iterator[PackedSequences]:
    epoch, order = -1, np.arange(len(packed))
    batch = start_batch
    while total is None or batch < total:
        batch_epoch, within = divmod(batch, per_epoch)
        if shuffle and batch_epoch != epoch:
            epoch = batch_epoch
            order = np.random.default_rng([seed, epoch]).permutation(len(packed))
        rows = order[within * batch_size : (within + 1) * batch_size]
        yield PackedSequences(packed.tokens[rows], packed.mask[rows])
        batch += 1
