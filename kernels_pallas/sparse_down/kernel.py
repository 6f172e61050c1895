"""Pallas sparse down projection: one program per tile of DB output columns accumulates, block by block of
BK active neurons, their gathered W_down rows weighted by the activations (no atomics: programs own disjoint
columns). The loop runs over the valid blocks only (a dynamic trip count).

Triton constraints as in sparse_gate_up/kernel.py; interpret=True on CPU. Legend: B tokens, D d_model,
F d_ff, K capacity, BK neurons per step, DB columns per program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float, Int


def _kernel(hidden_ref, indices_ref, count_ref, w_ref, out_ref, *, block: int, tile: int):
    columns = pl.ds(pl.multiple_of(pl.program_id(0) * tile, tile), tile)
    count = count_ref[0]
    n_tokens = hidden_ref.shape[0]

    def step(b, acc):
        ks = pl.ds(pl.multiple_of(b * block, block), block)
        valid = b * block + lax.broadcasted_iota(jnp.int32, (block,), 0) < count
        rows = jnp.where(valid, indices_ref[ks], 0)  # [BK]
        weights = jnp.where(valid[None, :], hidden_ref[:, ks].astype(jnp.float32), 0.0)  # [B, BK]
        w = w_ref[rows, columns].astype(jnp.float32)  # [BK, DB]
        return acc + jnp.sum(weights[:, :, None] * w[None, :, :], axis=1)  # [B, DB]

    acc = lax.fori_loop(0, (count + block - 1) // block, step, jnp.zeros((n_tokens, tile), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def sparse_down_kernel(
    hidden: Float[Array, "B K"],
    indices: Int[Array, " K"],
    count: Int[Array, " 1"],
    w_down: Float[Array, "F D"],
    *,
    block: int,
    tile: int,
    interpret: bool,
    num_warps: int = 4,
) -> Float[Array, "B D"]:
    """The Pallas call; K must be a multiple of `block` and D of `tile` (api.py pads and picks them)."""
    n_tokens, capacity = hidden.shape
    d_model = w_down.shape[1]
    if capacity % block or d_model % tile:
        raise ValueError(f"capacity {capacity} / d_model {d_model} not multiples of block {block} / tile {tile}")
    return pl.pallas_call(
        functools.partial(_kernel, block=block, tile=tile),
        out_shape=jax.ShapeDtypeStruct((n_tokens, d_model), jnp.float32),
        grid=(d_model // tile,),
        in_specs=[
            pl.BlockSpec((n_tokens, capacity), lambda j: (0, 0)),
            pl.BlockSpec((capacity,), lambda j: (0,)),
            pl.BlockSpec((1,), lambda j: (0,)),
            pl.BlockSpec(memory_space=pl.ANY),  # W_down, whole: rows are gathered
        ],
        out_specs=pl.BlockSpec((n_tokens, tile), lambda j: (0, j)),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="sparse_down",
    )(hidden, indices, count, w_down)
