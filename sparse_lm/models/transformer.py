"""Decoder-only transformer (LLaMA family) in Flax NNX, with a KV cache for incremental decoding.

Layers are a Python list, unrolled under jit: for batch-1 decode on CPU this ran 1.6x faster than
`lax.scan` over stacked layers. Legend: B batch, L length, S cache capacity, D d_model, V vocab.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from sparse_lm.models.attention import Attention, LayerCache
from sparse_lm.models.config import ModelConfig
from sparse_lm.models.ffn import FFN
from sparse_lm.models.layers import Norm


class KVCache(NamedTuple):
    """Per-layer keys and values plus the number of valid positions (shared by the batch)."""

    layers: tuple[LayerCache, ...]
    length: Int[Array, ""]

    @property
    def capacity(self) -> int:
        return self.layers[0].keys.shape[1]


def init_cache(config: ModelConfig, batch: int, capacity: int, dtype=jnp.float32) -> KVCache:
    """An empty cache holding up to `capacity` positions."""
    if capacity > config.max_seq_len:
        raise ValueError(f"cache capacity {capacity} exceeds model.max_seq_len={config.max_seq_len}")
    shape = (batch, capacity, config.n_kv_heads, config.resolved_head_dim)
    layers = tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layers))
    return KVCache(layers, jnp.zeros((), jnp.int32))


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        c = config
        self.attn_norm = Norm(c.d_model, c.norm, c.norm_eps, dtype)
        self.attn = Attention(
            c.d_model, c.n_heads, c.n_kv_heads, c.resolved_head_dim, c.rope_base, c.rope_layout,
            rngs=rngs, dtype=dtype,
        )
        self.ffn_norm = Norm(c.d_model, c.norm, c.norm_eps, dtype)
        self.ffn = FFN(c.d_model, c.d_ff, c.activation, threshold=c.layer_threshold(layer),
                       threshold_on=c.ffn_threshold_on, rngs=rngs, dtype=dtype)

    def __call__(self, x, positions, cache=None, start=0):
        attn_out, cache = self.attn(self.attn_norm(x), positions, cache, start)
        x = x + attn_out
        return x + self.ffn(self.ffn_norm(x)), cache


class Transformer(nnx.Module):
    """Embedding, blocks, final norm and output head.

    The output head `unembed` is stored [D, V] (x @ W, the layout XLA's CPU dot reads without copying).
    A tied model has no separate input embedding: it looks tokens up as columns of `unembed`; an untied one
    also holds `embed` [V, D].
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        c = config
        init = nnx.initializers.normal(stddev=c.d_model**-0.5)
        self.embed = None if c.tie_embeddings else nnx.Param(init(rngs.params(), (c.vocab_size, c.d_model), dtype))
        self.blocks = nnx.List([Block(c, i, rngs=rngs, dtype=dtype) for i in range(c.n_layers)])
        self.final_norm = Norm(c.d_model, c.norm, c.norm_eps, dtype)
        self.unembed = nnx.Param(init(rngs.params(), (c.d_model, c.vocab_size), dtype))

    def embed_tokens(self, tokens: Int[Array, "B L"]) -> Float[Array, "B L D"]:
        if self.embed is not None:
            return jnp.take(self.embed[...], tokens, axis=0)
        return jnp.moveaxis(jnp.take(self.unembed[...], tokens, axis=1), 0, -1)

    def forward_blocks(
        self, tokens: Int[Array, "B L"], cache: KVCache | None = None
    ) -> tuple[Float[Array, "B L D"], KVCache | None]:
        """The residual stream after the last block (before the final norm and the output head)."""
        batch, length = tokens.shape
        start = jnp.zeros((), jnp.int32) if cache is None else cache.length
        positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
        x = self.embed_tokens(tokens)
        new_layers = []
        for i, block in enumerate(self.blocks):
            x, layer_cache = block(x, positions, None if cache is None else cache.layers[i], start)
            new_layers.append(layer_cache)
        if cache is not None:
            cache = KVCache(tuple(new_layers), cache.length + length)
        return x, cache

    def __call__(
        self, tokens: Int[Array, "B L"], cache: KVCache | None = None
    ) -> tuple[Float[Array, "B L V"], KVCache | None]:
        """Logits for every position; with a cache, tokens continue the cached sequence."""
        x, cache = self.forward_blocks(tokens, cache)
        return self.final_norm(x) @ self.unembed[...], cache


def count_params(model: nnx.Module) -> int:
    state = nnx.state(model, nnx.Param)
    return sum(int(x.size) for x in jax.tree.leaves(state))


def abstract_model(config: ModelConfig) -> nnx.Module:
    """The model with ShapeDtypeStruct leaves: paper-size shapes without allocating their weights."""
    return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
