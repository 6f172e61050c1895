"""Pallas sparse gate/up: one program per block of BK active neurons gathers their gate and up rows (weights
stay whole in memory, un-tiled) and reduces them against x in chunks of DC columns.

Written for Triton (GPU): every tile has a power-of-two size, rows are gathered with a vector of indices (the
Triton backend has no scalar prefetch), and blocks past the valid count do no work. On CPU it runs with
interpret=True only (tests). Legend: B tokens, D d_model, F d_ff, K capacity, BK neurons per program, DC
columns per step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float, Int

from sparse_lm.models.config import Activation, ThresholdTarget
from sparse_lm.models.ffn import thresholded_hidden


def _kernel(x_ref, indices_ref, count_ref, *refs, block: int, chunk: int, gated: bool, activation: Activation,
            gate_threshold: float | None):
    weight_refs, out_ref = refs[:-1], refs[-1]
    program = pl.program_id(0)
    count = count_ref[0]
    out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)

    @pl.when(program * block < count)
    def _():
        k = program * block + lax.broadcasted_iota(jnp.int32, (block,), 0)
        valid = k < count
        rows = jnp.where(valid, indices_ref[...], 0)  # [BK]
        n_tokens, d_model = x_ref.shape

        def step(c, sums):
            columns = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
            x = x_ref[:, columns].astype(jnp.float32)  # [B, DC]
            return tuple(
                s + jnp.sum(x[:, None, :] * w_ref[rows, columns].astype(jnp.float32)[None, :, :], axis=-1)
                for s, w_ref in zip(sums, weight_refs, strict=True)
            )  # each [B, BK]

        zeros = tuple(jnp.zeros((n_tokens, block), jnp.float32) for _ in weight_refs)
        sums = lax.fori_loop(0, d_model // chunk, step, zeros)
        gate, up = sums if gated else (None, sums[0])
        hidden = thresholded_hidden(activation, gate, up, gate_threshold, ThresholdTarget.gate)
        out_ref[...] = jnp.where(valid[None, :], hidden, 0.0).astype(out_ref.dtype)


def sparse_gate_up_kernel(
    x: Float[Array, "B D"],
    indices: Int[Array, " K"],
    count: Int[Array, " 1"],
    w_gate: Float[Array, "F D"] | None,
    w_up: Float[Array, "F D"],
    activation: Activation,
    *,
    block: int,
    chunk: int,
    interpret: bool,
    gate_threshold: float | None = None,
    num_warps: int = 4,
) -> Float[Array, "B K"]:
    """The Pallas call; K must be a multiple of `block` and D of `chunk` (api.py pads and picks them).
    `gate_threshold` (a Python float, or None for none) zeroes a neuron unless |sigma(gate)| exceeds it."""
    n_tokens, d_model = x.shape
    capacity = indices.shape[0]
    if capacity % block or d_model % chunk:
        raise ValueError(f"capacity {capacity} / d_model {d_model} not multiples of block {block} / chunk {chunk}")
    weights = (w_up,) if w_gate is None else (w_gate, w_up)
    kernel = functools.partial(_kernel, block=block, chunk=chunk, gated=w_gate is not None, activation=activation,
                               gate_threshold=gate_threshold)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n_tokens, capacity), jnp.float32),
        grid=(capacity // block,),
        in_specs=[
            pl.BlockSpec((n_tokens, d_model), lambda i: (0, 0)),  # x, whole
            pl.BlockSpec((block,), lambda i: (i,)),  # this program's indices
            pl.BlockSpec((1,), lambda i: (0,)),  # count
            *(pl.BlockSpec(memory_space=pl.ANY) for _ in weights),  # weights, whole: rows are gathered
        ],
        out_specs=pl.BlockSpec((n_tokens, block), lambda i: (0, i)),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"sparse_gate_up_{activation.value}",
    )(x, indices, count, *weights)
