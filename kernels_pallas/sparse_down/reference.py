"""Reference sparse down projection (axpy over the active rows of W_down), in plain jnp.

Legend: B tokens, D d_model, F d_ff, K capacity of the active set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels_pallas.common import valid_mask


def sparse_down_reference(
    hidden: Float[Array, "B K"], indices: Int[Array, " K"], count: Int[Array, ""], w_down: Float[Array, "F D"]
) -> Float[Array, "B D"]:
    """y[b] = sum over k < count of hidden[b, k] * W_down[indices[k]]."""
    valid = valid_mask(indices.shape[0], count)
    rows = jnp.where(valid, indices, 0)
    weights = jnp.where(valid[None, :], hidden, 0.0)
    return jnp.dot(weights, w_down[rows], precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
