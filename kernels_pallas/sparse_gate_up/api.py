"""sparse_gate_up: activations of the active FFN neurons, by the reference (XLA) or the Pallas kernel."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from kernels_pallas.common import (
    Implementation,
    check_active,
    next_power_of_two,
    pallas_active_rows,
    power_of_two_divisor,
    resolve,
    resolve_gate_threshold,
)
from kernels_pallas.cpu import sparse_gate_up_cpu
from kernels_pallas.sparse_gate_up.kernel import sparse_gate_up_kernel
from kernels_pallas.sparse_gate_up.reference import sparse_gate_up_reference
from sparse_lm.models.config import Activation

MAX_BLOCK = 32  # active neurons per Pallas program
MAX_CHUNK = 128  # columns of D per reduction step


def check_ffn_weights(x, w_gate, w_up, activation: Activation) -> None:
    if activation.gated != (w_gate is not None):
        raise ValueError(f"activation {activation.value} {'needs' if activation.gated else 'takes no'} w_gate")
    if w_up.ndim != 2 or x.shape[-1] != w_up.shape[1]:
        raise ValueError(f"w_up must be [F, D] with D = x's last dim {x.shape[-1]}, got {w_up.shape}")
    if w_gate is not None and w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate {w_gate.shape} and w_up {w_up.shape} differ")


def sparse_gate_up(
    x: Float[Array, "B D"] | Float[Array, " D"],
    indices: Int[Array, " K"],
    count: int | Int[Array, ""],
    w_gate: Float[Array, "F D"] | None,
    w_up: Float[Array, "F D"],
    activation: Activation | str,
    *,
    token_mask: Bool[Array, "B K"] | None = None,
    gate_threshold: float | None = None,
    implementation: Implementation | str = Implementation.auto,
    interpret: bool | None = None,
) -> Float[Array, "B K"] | Float[Array, " K"]:
    """a[b, k] = act(gate, up) of neuron indices[k] for token b; 0 for padding (k >= count), with
    `token_mask` (batched decode: the union of the tokens' active sets, each token keeping its own) where the
    mask is False, and with `gate_threshold` t where |sigma(gate)| <= t.

    Args:
      x: one token [D] or B tokens [B, D].
      indices, count: the active set (see kernels_pallas.common); checked when concrete.
      w_gate, w_up: [F, D] (rows are neurons); w_gate None for ungated activations.
      activation: the FFN's activation pair.
      gate_threshold: the layer's threshold on the activated gate (model.ffn_threshold_on=gate: CATS, FATReLU), a
        Python float; None or -inf: none.
      implementation: xla (reference), pallas, ffi (C++, CPU) or auto (ffi on CPU when built, pallas on GPU).
      interpret: run Pallas interpreted; None: on the CPU backend only.
    """
    activation = Activation(activation)
    check_ffn_weights(x, w_gate, w_up, activation)
    check_active(indices, count, w_up.shape[0])
    gate_threshold = resolve_gate_threshold(gate_threshold, activation)
    single = x.ndim == 1
    x = x[None, :] if single else x
    count = jnp.asarray(count, jnp.int32)
    implementation, interpret = resolve(implementation, interpret)
    if implementation is Implementation.xla:
        hidden = sparse_gate_up_reference(x, indices, count, w_gate, w_up, activation, gate_threshold=gate_threshold)
    elif implementation is Implementation.ffi:
        hidden = sparse_gate_up_cpu(x, indices, count, w_gate, w_up, activation, gate_threshold=gate_threshold)
    else:
        capacity, n_tokens = indices.shape[0], x.shape[0]
        rows, block = pallas_active_rows(indices, MAX_BLOCK)
        tokens = jnp.pad(x, ((0, next_power_of_two(n_tokens) - n_tokens), (0, 0)))
        hidden = sparse_gate_up_kernel(
            tokens, rows, count.reshape(1), w_gate, w_up, activation, block=block,
            chunk=power_of_two_divisor(x.shape[1], MAX_CHUNK), interpret=interpret, gate_threshold=gate_threshold,
        )[:n_tokens, :capacity]
    if token_mask is not None:
        hidden = jnp.where(token_mask, hidden, 0.0)
    return hidden[0] if single else hidden
