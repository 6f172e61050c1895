"""Normalisation layers and rotary position embeddings (RoPE) as pure functions plus thin modules.

Legend: B batch, L length, H heads, Dh head dim, D d_model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from sparse_lm.models.config import NormKind, RopeLayout


def rms_norm(x: Float[Array, "... D"], scale: Float[Array, " D"], eps: float) -> Float[Array, "... D"]:
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * inv * scale).astype(x.dtype)


def layer_norm(
    x: Float[Array, "... D"], scale: Float[Array, " D"], bias: Float[Array, " D"], eps: float
) -> Float[Array, "... D"]:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)


class Norm(nnx.Module):
    """RMSNorm (scale only) or LayerNorm (scale and bias), chosen by `kind`."""

    def __init__(self, dim: int, kind: NormKind, eps: float, dtype=jnp.float32):
        self.kind = kind
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype)) if kind is NormKind.layernorm else None

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        if self.kind is NormKind.rmsnorm:
            return rms_norm(x, self.scale[...], self.eps)
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


def rope_angles(
    positions: Int[Array, "B L"], head_dim: int, base: float
) -> tuple[Float[Array, "B L half"], Float[Array, "B L half"]]:
    """cos and sin of position * base**(-2i/head_dim) for i < head_dim/2, in float32."""
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(
    x: Float[Array, "B L H Dh"],
    cos: Float[Array, "B L half"],
    sin: Float[Array, "B L half"],
    layout: RopeLayout,
) -> Float[Array, "B L H Dh"]:
    """Rotates feature pairs of every head by the position angle; `layout` says which features pair up."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.astype(jnp.float32)
    if layout is RopeLayout.interleaved:
        even, odd = x32[..., 0::2], x32[..., 1::2]
        rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
        return rotated.reshape(x.shape).astype(x.dtype)
    half = x.shape[-1] // 2
    first, second = x32[..., :half], x32[..., half:]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
