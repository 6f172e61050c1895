"""Reference sparse gate/up: the activations of the active neurons only, in plain jnp (gather + dot).

Legend: B tokens, D d_model, F d_ff, K capacity of the active set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels_pallas.common import valid_mask
from sparse_lm.models.config import Activation, ThresholdTarget
from sparse_lm.models.ffn import thresholded_hidden


def sparse_gate_up_reference(
    x: Float[Array, "B D"],
    indices: Int[Array, " K"],
    count: Int[Array, ""],
    w_gate: Float[Array, "F D"] | None,
    w_up: Float[Array, "F D"],
    activation: Activation,
    *,
    gate_threshold: float | None = None,
) -> Float[Array, "B K"]:
    """a[b, k] = act(W_gate[indices[k]] . x[b], W_up[indices[k]] . x[b]) for k < count, 0 for padding and, with a
    `gate_threshold` t, 0 unless |sigma(W_gate[indices[k]] . x[b])| > t (models.ffn.thresholded_hidden on the
    gate; None: no threshold)."""
    valid = valid_mask(indices.shape[0], count)
    rows = jnp.where(valid, indices, 0)
    # contract D of both operands: a transposed gathered matrix (w[rows].T) makes XLA's CPU dot 10x slower
    def project(w):
        return jnp.einsum("bd,kd->bk", x, w[rows], precision=jax.lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32)

    up = project(w_up)
    gate = None if w_gate is None else project(w_gate)
    hidden = thresholded_hidden(activation, gate, up, gate_threshold, ThresholdTarget.gate)
    return jnp.where(valid[None, :], hidden, 0.0)
