"""sparse_down: y = sum over the active neurons of a_k * W_down[k], by the reference (XLA) or the Pallas kernel."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels_pallas.common import (
    Implementation,
    check_active,
    next_power_of_two,
    pallas_active_rows,
    power_of_two_divisor,
    resolve,
)
from kernels_pallas.cpu import sparse_down_cpu
from kernels_pallas.sparse_down.kernel import sparse_down_kernel
from kernels_pallas.sparse_down.reference import sparse_down_reference

MAX_BLOCK = 32  # active neurons per accumulation step
MAX_TILE = 128  # output columns per Pallas program


def sparse_down(
    hidden: Float[Array, "B K"] | Float[Array, " K"],
    indices: Int[Array, " K"],
    count: int | Int[Array, ""],
    w_down: Float[Array, "F D"],
    *,
    implementation: Implementation | str = Implementation.auto,
    interpret: bool | None = None,
) -> Float[Array, "B D"] | Float[Array, " D"]:
    """y[b] = sum over k < count of hidden[b, k] * W_down[indices[k]] (W_down stored [F, D]).

    Args:
      hidden: activations of the active neurons, [K] or [B, K] (from sparse_gate_up).
      indices, count: the active set (see kernels_pallas.common); checked when concrete.
      implementation: xla (reference), pallas, ffi (C++, CPU) or auto (ffi on CPU when built, pallas on GPU).
      interpret: run Pallas interpreted; None: on the CPU backend only.
    """
    if w_down.ndim != 2 or hidden.shape[-1] != indices.shape[0]:
        raise ValueError(f"hidden {hidden.shape} must end in the capacity {indices.shape[0]}; w_down must be [F, D], "
                         f"got {w_down.shape}")
    check_active(indices, count, w_down.shape[0])
    single = hidden.ndim == 1
    hidden = hidden[None, :] if single else hidden
    count = jnp.asarray(count, jnp.int32)
    implementation, interpret = resolve(implementation, interpret)
    if implementation is Implementation.xla:
        out = sparse_down_reference(hidden, indices, count, w_down)
    elif implementation is Implementation.ffi:
        out = sparse_down_cpu(hidden, indices, count, w_down)
    else:
        (n_tokens, capacity), d_model = hidden.shape, w_down.shape[1]
        rows, block = pallas_active_rows(indices, MAX_BLOCK)
        weights = jnp.pad(hidden, ((0, next_power_of_two(n_tokens) - n_tokens), (0, rows.shape[0] - capacity)))
        out = sparse_down_kernel(weights, rows, count.reshape(1), w_down, block=block,
                                 tile=power_of_two_divisor(d_model, MAX_TILE), interpret=interpret)[:n_tokens]
    return out[0] if single else out
