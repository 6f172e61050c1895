"""Reference sparse FFN: the dense FFN with every neuron outside the active set zeroed, computed densely. The
oracle of the sparse paths (it reads every weight, so it is never the fast path).

Legend: B tokens, D d_model, F d_ff, K capacity of the active set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from kernels_pallas.common import valid_mask
from sparse_lm.models.config import Activation, ThresholdTarget
from sparse_lm.models.ffn import thresholded_hidden


def active_neuron_mask(indices: Int[Array, " K"], count, d_ff: int, token_mask: Bool[Array, "B K"] | None = None,
                       n_tokens: int = 1) -> Bool[Array, "B F"]:
    """Per token, which of the F neurons are active."""
    valid = valid_mask(indices.shape[0], count)
    keep = jnp.broadcast_to(valid, (n_tokens, indices.shape[0]))
    if token_mask is not None:
        keep = keep & token_mask
    rows = jnp.where(valid, indices, d_ff)  # padding scatters out of range and is dropped
    return jnp.zeros((n_tokens, d_ff), bool).at[:, rows].set(keep, mode="drop")


def masked_dense_ffn(
    x: Float[Array, "B D"], neuron_mask: Bool[Array, "B F"], w_gate: Float[Array, "F D"] | None,
    w_up: Float[Array, "F D"], w_down: Float[Array, "F D"], activation: Activation, *,
    gate_threshold: float | None = None,
) -> Float[Array, "B D"]:
    """The dense FFN with each token's neurons outside `neuron_mask` zeroed, and with `gate_threshold` t those
    whose |sigma(gate)| <= t (None: no threshold)."""
    activation = Activation(activation)
    highest = jax.lax.Precision.HIGHEST
    up = jnp.einsum("bd,fd->bf", x, w_up, precision=highest)
    gate = None if w_gate is None else jnp.einsum("bd,fd->bf", x, w_gate, precision=highest)
    hidden = jnp.where(neuron_mask, thresholded_hidden(activation, gate, up, gate_threshold, ThresholdTarget.gate),
                       0.0)
    return jnp.dot(hidden, w_down, precision=highest)
