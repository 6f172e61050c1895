"""Reference int4 predictor: which neurons of a ReLU-family FFN fire, read from a 4-bit copy of its own rows.

A neuron of relu(g) * relu(u) (dReLU) fires exactly when both pre-activations are positive; ReGLU needs the gate,
ungated ReLU / ReLU^2 the up projection. The predictor keeps those rows in 4 bits (symmetric, groups of 32 along D,
one float32 scale a group: 0.56 bytes a weight instead of 4) and x in int8 (the same groups, absmax / 127), and
scores a neuron by its quantised pre-activation over |row| |x|, the smallest over the projections that decide.
Quantisation error is then about one scale for every row and token, so one threshold a layer fits all neurons.
The FFN itself stays exact: the predicted neurons are computed from the float32 rows.

Storage of a row (the layout the C++ twin reads): per group, element i in the low nibble of byte i and element
i + 16 in the high nibble, each stored as q + 8 with q in [-7, 7].
Legend: B tokens, D d_model, F d_ff, G = D / 32 groups.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, UInt8

from kernels_pallas.sparse_ffn.reference import masked_dense_ffn
from sparse_lm.models.config import Activation

GROUP = 32
WEIGHT_LEVELS = 7  # q in [-7, 7]
X_LEVELS = 127


class Int4Rows(NamedTuple):
    """One projection's rows [F, D] in 4 bits."""

    packed: UInt8[Array, "F D/2"]
    scales: Float[Array, "F G"]
    inv_norms: Float[Array, " F"]  # 1 / |dequantised row| (0 for an all-zero row)


def decisive_projections(activation: Activation | str) -> tuple[bool, bool]:
    """(gate, up): the projections whose signs decide whether a neuron's activation is exactly zero."""
    activation = Activation(activation)
    table = {Activation.drelu: (True, True), Activation.reglu: (True, False), Activation.relu: (False, True),
             Activation.relu2: (False, True)}
    if activation not in table:
        raise ValueError(f"the int4 predictor needs an FFN activation with exact zeros (drelu, reglu, relu, relu2); "
                         f"{activation.value} has none")
    return table[activation]


def quantize_rows(rows: Float[np.ndarray, "F D"]) -> Int4Rows:
    """4-bit copy of float rows [F, D] (D a multiple of 32), computed once on the host."""
    rows = np.asarray(rows, np.float32)
    d_ff, d_model = rows.shape
    if d_model % GROUP:
        raise ValueError(f"the int4 predictor needs d_model divisible by {GROUP}, got {d_model}")
    groups = rows.reshape(d_ff, d_model // GROUP, GROUP)
    scales = np.abs(groups).max(axis=-1) / WEIGHT_LEVELS
    safe = np.where(scales > 0, scales, 1.0)[..., None]
    q = np.clip(np.rint(groups / safe), -WEIGHT_LEVELS, WEIGHT_LEVELS).astype(np.int8)
    stored = (q + 8).astype(np.uint8)
    packed = stored[..., : GROUP // 2] | (stored[..., GROUP // 2 :] << 4)
    norms = np.sqrt(np.sum((q * scales[..., None]).astype(np.float64) ** 2, axis=(1, 2)))
    inv_norms = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0)
    return Int4Rows(jnp.asarray(packed.reshape(d_ff, d_model // 2)), jnp.asarray(scales.astype(np.float32)),
                    jnp.asarray(inv_norms.astype(np.float32)))


def dequantize_rows(rows: Int4Rows) -> Float[Array, "F D"]:
    packed = rows.packed.reshape(rows.packed.shape[0], -1, GROUP // 2)
    low = (packed & 0x0F).astype(jnp.int32) - 8
    high = (packed >> 4).astype(jnp.int32) - 8
    q = jnp.concatenate([low, high], axis=-1).astype(jnp.float32)
    return (q * rows.scales[..., None]).reshape(rows.packed.shape[0], -1)


def quantize_x(x: Float[Array, "... D"]) -> Float[Array, "... D"]:
    """x rounded to int8 in groups of 32 (scale absmax / 127), returned dequantised."""
    groups = x.reshape(*x.shape[:-1], -1, GROUP).astype(jnp.float32)
    scales = jnp.max(jnp.abs(groups), axis=-1, keepdims=True) / X_LEVELS
    safe = jnp.where(scales > 0, scales, 1.0)
    q = jnp.where(scales > 0, jnp.clip(jnp.round(groups / safe), -X_LEVELS, X_LEVELS), 0.0)
    return (q * scales).reshape(x.shape)


def int4_scores_reference(
    x: Float[Array, "... D"], gate: Int4Rows | None, up: Int4Rows | None
) -> Float[Array, "... F"]:
    """Per neuron, min over the given projections of (quantised x . quantised row) / (|row| |x|)."""
    if gate is None and up is None:
        raise ValueError("int4 scores need the gate rows, the up rows or both")
    xq = quantize_x(x)
    norm = jnp.sqrt(jnp.sum(xq * xq, axis=-1, keepdims=True))
    inv_norm_x = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)
    scores = None
    for rows in (gate, up):
        if rows is None:
            continue
        dots = jnp.einsum("...d,fd->...f", xq, dequantize_rows(rows), precision=jax.lax.Precision.HIGHEST)
        score = dots * rows.inv_norms * inv_norm_x
        scores = score if scores is None else jnp.minimum(scores, score)
    return scores


def capped_mask(predicted: Bool[Array, "... F"], capacity: int) -> Bool[Array, "... F"]:
    """The first `capacity` predicted neurons (ascending) of each token."""
    return predicted & (jnp.cumsum(predicted, axis=-1) <= capacity)


def quant_sparse_ffn_reference(
    x: Float[Array, "B D"], gate_q: Int4Rows | None, up_q: Int4Rows | None, threshold: float, capacity: int,
    w_gate: Float[Array, "F D"] | None, w_up: Float[Array, "F D"], w_down: Float[Array, "F D"],
    activation: Activation | str, *, gate_threshold: float | None = None,
) -> Float[Array, "B D"]:
    """The dense FFN keeping, per token, the first `capacity` neurons scoring above `threshold`, and of those only
    the ones whose activated gate passes `gate_threshold` (None: no gate threshold)."""
    mask = capped_mask(int4_scores_reference(x, gate_q, up_q) > threshold, capacity)
    return masked_dense_ffn(x, mask, w_gate, w_up, w_down, Activation(activation), gate_threshold=gate_threshold)
