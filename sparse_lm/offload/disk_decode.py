"""The decode step through a disk tier: per layer, int4 scores in RAM, then one FFI call that makes the predicted
neurons resident in the tier and computes their FFN exactly as the in-RAM engine does; optionally each block also
guesses the next layer's neurons and starts reading them while the next attention computes (read-ahead).
Legend: B batch, L length (and layers), D d_model, F d_ff, N sequences, S sequence length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from kernels_pallas.cpu import ACTIVATION_CODES, default_threads, ffi_gate_threshold, int4_scores_cpu
from kernels_pallas.quant_predict import capped_mask
from sparse_lm.models.capture import capture_forward, split_capturing
from sparse_lm.models.config import Activation
from sparse_lm.models.ffn import CapturePoint
from sparse_lm.offload.disk import library
from sparse_lm.offload.disk_cache import DiskTier
from sparse_lm.predictors.quantized import Int4Predictor, Int4PredictorSet
from sparse_lm.sparse.engine import gate_threshold_of


def disk_tier_ffn(x: Float[Array, "1 D"], scores: Float[Array, "1 F"], tier: int, layer: int, threshold: float,
                  capacity: int, activation: Activation, gate_threshold: float | None = None) -> Float[Array, "1 D"]:
    """One layer's FFN output for one token: the first `capacity` neurons scoring above `threshold`, from `tier`,
    each zero unless its activated gate passes `gate_threshold` (None: no gate threshold)."""
    library()
    # Not marked side-effecting although the tier's state changes: every call's output feeds the next layer, so XLA
    # can neither drop nor reorder it, and side-effecting calls made the whole decode step ~30% slower here (32 vs
    # 44 tokens/s with every row resident).
    call = jax.ffi.ffi_call("sparse_lm_disk_tier_ffn", jax.ShapeDtypeStruct(x.shape, jnp.float32))
    return call(x, scores, tier=np.int64(tier), layer=np.int64(layer), threshold=np.float32(threshold),
                capacity=np.int64(capacity), activation=np.int64(ACTIVATION_CODES[Activation(activation)]),
                gate_threshold=ffi_gate_threshold(gate_threshold), threads=np.int64(default_threads()))


def disk_tier_prefetch(h: Float[Array, "1 D"], scores: Float[Array, "1 F"], tier: int, layer: int, threshold: float,
                       capacity: int) -> Float[Array, "1 D"]:
    """Starts reading `layer`'s neurons scoring above `threshold` (at most `capacity`) and returns `h` unchanged:
    whatever reads the result runs after the reads are issued."""
    library()
    call = jax.ffi.ffi_call("sparse_lm_disk_tier_prefetch", jax.ShapeDtypeStruct(h.shape, jnp.float32))
    return call(h, scores, tier=np.int64(tier), layer=np.int64(layer), threshold=np.float32(threshold),
                capacity=np.int64(capacity))


class DiskTierExecutor(nnx.Module):
    """One layer's FFN through a disk tier: int4 scores (in RAM), then the tier's FFI call. One token at a time."""

    def __init__(self, predictor: Int4Predictor, threshold: float, capacity: int, tier: DiskTier, layer: int):
        self.predictor = predictor
        self.threshold = float(threshold)
        self.capacity = int(capacity)
        self.tier = tier.handle  # an address: static, so the compiled step holds it
        self.layer = int(layer)

    def __call__(self, ffn, x: Float[Array, "B L D"]) -> Float[Array, "B L D"]:
        if x.shape[:-1] != (1, 1):
            raise ValueError(f"the disk tier computes one token at a time (feed prompts token by token); got x of "
                             f"shape {x.shape}")
        p = self.predictor
        scores = int4_scores_cpu(x[0], p.gate, p.up, p.activation)
        return disk_tier_ffn(x[0], scores, self.tier, self.layer, self.threshold, self.capacity, p.activation,
                             gate_threshold_of(ffn))[None]


class ReadAheadBlock(nnx.Module):
    """A transformer Block (the same modules and arithmetic) that, once its FFN is added to the residual, guesses the
    next layer's neurons from that residual (the next layer's norm and int4 predictor, skipping its attention, whose
    share of the residual is small) and starts reading the missing ones while the next attention computes."""

    def __init__(self, block, next_block, next_predictor: Int4Predictor, threshold: float, capacity: int,
                 tier: DiskTier, next_layer: int):
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = block.attn_norm, block.attn, block.ffn_norm, block.ffn
        self.next_norm = next_block.ffn_norm
        self.next_predictor = next_predictor
        self.threshold = float(threshold)
        self.capacity = int(capacity)
        self.tier = tier.handle
        self.next_layer = int(next_layer)

    def __call__(self, x, positions, cache=None, start=0):
        attn_out, cache = self.attn(self.attn_norm(x), positions, cache, start)
        x = x + attn_out
        x = x + self.ffn(self.ffn_norm(x))
        p = self.next_predictor
        scores = int4_scores_cpu(self.next_norm(x)[0], p.gate, p.up, p.activation)
        x = disk_tier_prefetch(x[0], scores, self.tier, self.next_layer, self.threshold, self.capacity)[None]
        return x, cache


def fixed_region_model(model):
    """A copy of `model` sharing every array except the FFN rows, which become empty: a decode step built from it
    cannot read FFN rows from RAM, only through an installed disk tier."""
    clone = nnx.clone(model)
    d_model = model.config.d_model
    for block in clone.blocks:
        ffn = block.ffn
        if ffn.w_gate is not None:
            ffn.w_gate = nnx.Param(jnp.zeros((d_model, 0), jnp.float32))
        ffn.w_up = nnx.Param(jnp.zeros((d_model, 0), jnp.float32))
        ffn.w_down = nnx.Param(jnp.zeros((0, d_model), jnp.float32))
    return clone


def install_disk_tier(model, predictors: Int4PredictorSet, capacities: list[int], tier: DiskTier,
                      read_ahead_margin: float | None = None) -> None:
    """Routes every FFN of `model` (a `fixed_region_model`) through `tier` with the int4 predictors' choices. With
    `read_ahead_margin`, every block but the last becomes a ReadAheadBlock guessing the next layer's neurons with
    its threshold lowered by the margin (more guesses: fewer misses, more wasted reads)."""
    predictors.check_fits(model.config)
    if len(capacities) != model.config.n_layers:
        raise ValueError(f"{len(capacities)} capacities for a model of {model.config.n_layers} layers")
    if (tier.layout.n_layers, tier.layout.d_ff, tier.layout.d_model) != (
            model.config.n_layers, model.config.d_ff, model.config.d_model):
        raise ValueError("the disk tier's bundle does not have the model's shape")
    thresholds = np.asarray(predictors.thresholds[...])
    for layer, block in enumerate(model.blocks):
        block.ffn.executor = DiskTierExecutor(predictors.layers[layer], thresholds[layer], capacities[layer], tier,
                                              layer)
    if read_ahead_margin is None:
        return
    blocks = list(model.blocks)
    for layer in range(len(blocks) - 1):
        model.blocks[layer] = ReadAheadBlock(blocks[layer], blocks[layer + 1], predictors.layers[layer + 1],
                                             thresholds[layer + 1] - read_ahead_margin, capacities[layer + 1], tier,
                                             layer + 1)


def access_profile(model, predictors: Int4PredictorSet, capacities: list[int], tokens: Int[np.ndarray, "N S"],
                   batch_size: int = 4) -> tuple[np.ndarray, np.ndarray, int]:
    """Per neuron of every layer, on `tokens`: how often it is predicted (after the capacity cap) and how often it
    fires ([L, F] each), and the number of tokens counted."""
    graphdef, params = split_capturing(model, [CapturePoint.ffn_input, CapturePoint.ffn_hidden])
    predictor_def, predictor_state = nnx.split(predictors)

    @jax.jit
    def counts(params, predictor_state, batch):
        _, captured = capture_forward(nnx.merge(graphdef, params), batch)
        merged = nnx.merge(predictor_def, predictor_state)
        thresholds = merged.thresholds[...]
        predicted, fired = [], []
        for i, layer in enumerate(merged.layers):
            scores = layer(captured[CapturePoint.ffn_input][i])
            mask = capped_mask(scores > thresholds[i], capacities[i])
            predicted.append(mask.reshape(-1, mask.shape[-1]).sum(0))
            hidden = captured[CapturePoint.ffn_hidden][i]
            fired.append((hidden != 0).reshape(-1, hidden.shape[-1]).sum(0))
        return jnp.stack(predicted), jnp.stack(fired)

    batch_size = min(batch_size, len(tokens))
    if batch_size < 1:
        raise ValueError("no token sequences to profile")
    predicted = fired = 0
    starts = range(0, len(tokens) - batch_size + 1, batch_size)
    for start in starts:
        p, f = jax.device_get(counts(params, predictor_state, jnp.asarray(tokens[start : start + batch_size])))
        predicted, fired = predicted + p.astype(np.int64), fired + f.astype(np.int64)
    return predicted, fired, len(starts) * batch_size * tokens.shape[1]
