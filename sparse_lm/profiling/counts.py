"""Streaming firing statistics per layer and neuron, and their checkpoint file.

Memory is O(layers x d_ff) whatever the number of tokens: counts of firings, sums of |a|, tokens seen.
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import numpy as np
from jaxtyping import Float, Int

from sparse_lm.utils.io import atomic_write_bytes

FORMAT_VERSION = 1
_FIELDS = ("counts", "abs_sum", "tokens", "batches", "fingerprint", "version")


class CountsFileError(ValueError):
    """A counts/checkpoint file that cannot be read or does not fit; the message names the file."""


@dataclasses.dataclass
class FiringCounts:
    """Accumulated firing statistics.

    Attributes:
      counts: tokens for which neuron (layer, i) fired, [L, F] int64.
      abs_sum: sum over tokens of |a| per neuron, [L, F] float64.
      tokens: tokens profiled.
      batches: batches profiled (the resume position).
      fingerprint: identifies the run (model, data, rule, thresholds) the counts belong to.
      extra: counts [L, F] of further firing rules profiled in the same pass, by rule name.
    """

    counts: Int[np.ndarray, "L F"]
    abs_sum: Float[np.ndarray, "L F"]
    tokens: int = 0
    batches: int = 0
    fingerprint: str = ""
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @classmethod
    def zeros(cls, n_layers: int, d_ff: int, fingerprint: str = "", extra_rules=()) -> FiringCounts:
        shape = (n_layers, d_ff)
        extra = {str(rule): np.zeros(shape, np.int64) for rule in extra_rules}
        return cls(np.zeros(shape, np.int64), np.zeros(shape, np.float64), 0, 0, fingerprint, extra)

    def add(self, counts: np.ndarray, abs_sum: np.ndarray, tokens: int, extra: dict | None = None) -> None:
        self.counts += np.asarray(counts, np.int64)
        self.abs_sum += np.asarray(abs_sum, np.float64)
        for name, value in (extra or {}).items():
            self.extra[name] += np.asarray(value, np.int64)
        self.tokens += int(tokens)
        self.batches += 1

    def save(self, path: str | os.PathLike) -> Path:
        buffer = io.BytesIO()
        np.savez(
            buffer, counts=self.counts, abs_sum=self.abs_sum, tokens=np.int64(self.tokens),
            batches=np.int64(self.batches), fingerprint=np.str_(self.fingerprint), version=np.int64(FORMAT_VERSION),
            **{f"extra_{name}": value for name, value in self.extra.items()},
        )
        return atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> FiringCounts:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                fields = {key: data[key] for key in _FIELDS}
                extra = {key.removeprefix("extra_"): data[key] for key in data.files if key.startswith("extra_")}
        except FileNotFoundError:
            raise
        except Exception as e:  # zip/npy errors on a truncated or foreign file
            raise CountsFileError(f"{path}: not a readable counts file ({type(e).__name__}: {e})") from e
        if int(fields["version"]) != FORMAT_VERSION:
            raise CountsFileError(f"{path}: counts format {int(fields['version'])}, expected {FORMAT_VERSION}")
        counts, abs_sum = fields["counts"], fields["abs_sum"]
        if counts.ndim != 2 or counts.shape != abs_sum.shape or counts.dtype != np.int64:
            raise CountsFileError(f"{path}: counts {counts.shape}/{counts.dtype} and abs_sum {abs_sum.shape} disagree")
        tokens = int(fields["tokens"])
        if tokens < 0 or (counts < 0).any() or (counts > tokens).any():
            raise CountsFileError(f"{path}: counts outside [0, tokens={tokens}]")
        if any(value.shape != counts.shape for value in extra.values()):
            raise CountsFileError(f"{path}: extra rule counts do not match counts {counts.shape}")
        return cls(counts, abs_sum, tokens, int(fields["batches"]), str(fields["fingerprint"]), extra)
