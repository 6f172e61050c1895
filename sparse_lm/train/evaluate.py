"""Validation during and after training: next-token loss and exact-zero FFN sparsity, optionally under
forced top-k sparsity.

Legend: N rows, L row length.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sparse_lm.models.transformer import Transformer
from sparse_lm.train.step import forward_with_hidden, split_model


@dataclasses.dataclass(frozen=True)
class EvalResult:
    nll: float  # mean next-token negative log-likelihood (nats)
    zero_fraction: tuple[float, ...]  # per layer: share of FFN hidden activations exactly 0
    tokens: int  # predictions scored

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def sparsity(self) -> float:
        return float(np.mean(self.zero_fraction))


@functools.partial(jax.jit, static_argnums=0)
def _batch_sums(graphdef, params, rest, tokens):
    logits, hiddens = forward_with_hidden(graphdef, params, rest, tokens[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    zeros = jnp.stack([jnp.sum(h == 0) for h in hiddens])
    return jnp.sum(nll), zeros


def evaluate(model: Transformer, rows: np.ndarray, batch_size: int) -> EvalResult:
    """Loss and sparsity of `model` over `rows` [N, L] (whole batches; a last partial batch is scored too)."""
    if len(rows) == 0:
        raise ValueError("no validation rows to evaluate")
    graphdef, params, rest = split_model(model)
    nll_sum, zeros, predictions = 0.0, np.zeros(model.config.n_layers), 0
    for first in range(0, len(rows), batch_size):
        batch = jnp.asarray(rows[first : first + batch_size])
        batch_nll, batch_zeros = _batch_sums(graphdef, params, rest, batch)
        nll_sum += float(batch_nll)
        zeros += np.asarray(batch_zeros, dtype=np.float64)
        predictions += batch.shape[0] * (batch.shape[1] - 1)
    hidden_values = predictions * model.config.d_ff
    return EvalResult(nll_sum / predictions, tuple(float(z / hidden_values) for z in zeros), predictions)


def combine(results: list[EvalResult]) -> EvalResult:
    """One result over the union of the scored tokens (token-weighted means)."""
    tokens = sum(r.tokens for r in results)
    nll = sum(r.nll * r.tokens for r in results) / tokens
    zero = np.sum([np.asarray(r.zero_fraction) * r.tokens for r in results], axis=0) / tokens
    return EvalResult(nll, tuple(float(z) for z in zero), tokens)


def set_keep_top(model: Transformer, keep_fraction: float | None) -> None:
    """Forces every FFN to keep only the top `keep_fraction` of |a| per token (None: no forcing)."""
    keep = None if keep_fraction is None else max(1, round(keep_fraction * model.config.d_ff))
    for block in model.blocks:
        block.ffn.keep_top = keep


def evaluate_top_k(model: Transformer, rows: np.ndarray, batch_size: int, keep_fraction: float) -> EvalResult:
    """`evaluate` with forced top-k sparsity; the model is left as it was."""
    set_keep_top(model, keep_fraction)
    try:
        return evaluate(model, rows, batch_size)
    finally:
        set_keep_top(model, None)


def model_from_state(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State) -> Transformer:
    return nnx.merge(graphdef, jax.device_get(params), rest)
