"""quant_predict api: the C++ twin on CPU (one call per token for the fused FFN), the jnp reference elsewhere.

There is no Pallas kernel for the int4 scores yet: on a GPU the reference (one dense int4-dequantised product)
is what runs, and the exact rows go through kernels_pallas.sparse_ffn.
Legend: B tokens, D d_model, F d_ff.
"""

from __future__ import annotations

import jax
from jaxtyping import Array, Float, Int

from kernels_pallas import cpu
from kernels_pallas.common import Implementation, resolve_gate_threshold
from kernels_pallas.quant_predict.reference import (
    Int4Rows,
    capped_mask,
    int4_scores_reference,
    quant_sparse_ffn_reference,
)
from sparse_lm.models.config import Activation


def choose(implementation: Implementation | str) -> Implementation:
    """ffi or xla: `auto` is the C++ twin on a CPU where it is built, the reference otherwise."""
    implementation = Implementation(implementation)
    on_cpu = jax.default_backend() == "cpu"
    if implementation is Implementation.auto:
        return Implementation.ffi if on_cpu and cpu.available() else Implementation.xla
    if implementation is Implementation.pallas:
        raise ValueError("quant_predict has no Pallas kernel: use implementation=xla (or auto) for the int4 predictor")
    if implementation is Implementation.ffi and not on_cpu:
        raise ValueError(f"implementation=ffi runs on the CPU only; the backend is {jax.default_backend()}")
    return implementation


def int4_scores(
    x: Float[Array, "B D"], gate: Int4Rows | None, up: Int4Rows | None, activation: Activation | str,
    *, implementation: Implementation | str = Implementation.auto,
) -> Float[Array, "B F"]:
    if choose(implementation) is Implementation.ffi:
        return cpu.int4_scores_cpu(x, gate, up, Activation(activation))
    return int4_scores_reference(x, gate, up)


def quant_sparse_ffn(
    x: Float[Array, "B D"], gate_q: Int4Rows | None, up_q: Int4Rows | None, threshold: float, capacity: int,
    w_gate: Float[Array, "F D"] | None, w_up: Float[Array, "F D"], w_down: Float[Array, "F D"],
    activation: Activation | str, *, gate_threshold: float | None = None,
    implementation: Implementation | str = Implementation.auto,
) -> tuple[Float[Array, "B D"], Int[Array, " B"]]:
    """FFN output of the neurons the int4 predictor selects (at most `capacity` per token), each zero unless its
    activated gate passes `gate_threshold` (the layer's FATReLU threshold, a Python float; None or -inf: none), and
    how many it selected per token. The C++ twin takes one token; the reference any number."""
    activation = Activation(activation)
    gate_threshold = resolve_gate_threshold(gate_threshold, activation)
    if choose(implementation) is Implementation.ffi and x.shape[0] == 1:
        y, count = cpu.quant_sparse_ffn_cpu(x, gate_q, up_q, threshold, capacity, w_gate, w_up, w_down, activation,
                                            gate_threshold=gate_threshold)
        return y, count
    predicted = int4_scores_reference(x, gate_q, up_q) > threshold
    count = capped_mask(predicted, capacity).sum(axis=-1).astype("int32")
    return quant_sparse_ffn_reference(x, gate_q, up_q, threshold, capacity, w_gate, w_up, w_down, activation,
                                      gate_threshold=gate_threshold), count
