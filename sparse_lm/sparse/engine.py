"""The sparse decode engine: per layer, the activation predictor picks the neurons to compute (logits above the
layer's threshold, at most a static capacity chosen from the profile of predicted counts), and the FFN computes
only those rows with the sparse kernels. Attention stays dense.

One token at a time (decode) goes through kernels_pallas.sparse_ffn (the C++ twin on CPU, Pallas on GPU); longer
inputs (prefill, perplexity) compute densely and keep the same neurons, so the engine's perplexity is measured
with the full-sequence forward. Shapes never depend on the active count, so the decode step compiles once.
The predictors are trained low-rank ones (PredictorSet) or int4 copies of the FFN's own rows (Int4PredictorSet);
with int4 predictors a one-token CPU step is one fused C++ call (kernels_pallas.quant_predict). An FFN thresholded
on its activated gate (model.ffn_threshold_on=gate: FATReLU, CATS) passes its threshold to every kernel, so the
engine keeps exactly the neurons the dense model keeps among the predicted ones.
Legend: B batch, L length, D d_model, F d_ff, K capacity.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from kernels_pallas import Implementation, sparse_down, sparse_ffn
from kernels_pallas.common import resolve
from kernels_pallas.cpu import predict_gate_up_cpu
from kernels_pallas.quant_predict import capped_mask, quant_sparse_ffn
from sparse_lm.models.capture import capture_forward, split_capturing
from sparse_lm.models.config import ThresholdTarget
from sparse_lm.models.ffn import CapturePoint, thresholded_hidden
from sparse_lm.predictors.module import HiddenActivation, PredictorSet
from sparse_lm.predictors.quantized import Int4Predictor, Int4PredictorSet


@dataclasses.dataclass(frozen=True)
class SparseEngineConfig:
    """Attributes:
    implementation: kernels for one-token steps (auto: the C++ twin on CPU, Pallas on GPU; xla: gather + dot).
    capacity_quantile: each layer's capacity is this quantile of its predicted count per token on the
      calibration tokens (rounded up to `capacity_multiple`); tokens predicting more keep the first `capacity`
      predicted neurons.
    huge_pages: back the model's weights (dense and sparse alike) with 2 MiB pages once installed (used by the
      decode benchmark): gathered rows otherwise cross a 4 KiB page, and a TLB miss, every 1,024 floats.
    """

    implementation: Implementation = Implementation.auto
    capacity_quantile: float = 0.999
    capacity_multiple: int = 16
    huge_pages: bool = True

    def __post_init__(self):
        object.__setattr__(self, "implementation", Implementation(self.implementation))
        if not 0 < self.capacity_quantile <= 1:
            raise ValueError(f"sparse.capacity_quantile must be in (0, 1], got {self.capacity_quantile}")
        if self.capacity_multiple < 1:
            raise ValueError(f"sparse.capacity_multiple must be >= 1, got {self.capacity_multiple}")


def active_set(
    logits: Float[Array, " F"], threshold: float, capacity: int
) -> tuple[Int[Array, " K"], Int[Array, ""]]:
    """The neurons with logits above `threshold` as ascending indices padded with 0 to K = capacity, and their
    count. Past the capacity (a `1 - capacity_quantile` share of tokens by construction), the highest-numbered
    predicted neurons are dropped: a scan, not a top-k (which cost more than the FFN rows it saved here)."""
    predicted = logits > threshold
    (indices,) = jnp.nonzero(predicted, size=capacity, fill_value=0)
    count = jnp.minimum(jnp.sum(predicted), capacity).astype(jnp.int32)
    return indices.astype(jnp.int32), count


def gate_threshold_of(ffn) -> float | None:
    """The threshold a sparse kernel applies to an FFN's activated gate: the FFN's own threshold when it is on the
    gate (threshold_on=gate), else None."""
    return ffn.threshold if ffn.threshold_on is ThresholdTarget.gate else None


def active_mask(logits: Float[Array, "... F"], threshold: float, capacity: int) -> Bool[Array, "... F"]:
    """The same neurons as `active_set`, as a mask over F (any leading shape)."""
    return capped_mask(logits > threshold, capacity)


class SparseExecutor(nnx.Module):
    """One layer's sparse FFN: its predictor, threshold, capacity and the [F, D] rows of the gate and up
    projections (W_down is already stored [F, D] and is read from the FFN itself)."""

    def __init__(self, ffn, predictor: nnx.Module, threshold: float, capacity: int, implementation: Implementation):
        self.predictor = predictor
        self.threshold = float(threshold)
        self.capacity = int(capacity)
        self.implementation = Implementation(implementation)
        self.gate_rows = None if ffn.w_gate is None else nnx.Param(jnp.asarray(ffn.w_gate[...]).T.copy())
        self.up_rows = nnx.Param(jnp.asarray(ffn.w_up[...]).T.copy())

    def __call__(self, ffn, x: Float[Array, "B L D"]) -> Float[Array, "B L D"]:
        gate_rows = None if self.gate_rows is None else self.gate_rows[...]
        gate_threshold = gate_threshold_of(ffn)
        one_token_ffi = x.shape[:-1] == (1, 1) and resolve(self.implementation)[0] is Implementation.ffi
        if one_token_ffi and isinstance(self.predictor, Int4Predictor):
            # one token on CPU: int4 scores, compaction and the exact rows (gate, up behind it, down) in one call
            y, _ = quant_sparse_ffn(x[0], self.predictor.gate, self.predictor.up, self.threshold, self.capacity,
                                    gate_rows, self.up_rows[...], ffn.w_down[...], ffn.activation,
                                    gate_threshold=gate_threshold, implementation=Implementation.ffi)
            return y[None]
        if one_token_ffi:
            # one token on CPU: predictor, compaction and gate/up in one C++ call, then the down rows
            p = self.predictor
            hidden, indices, count = predict_gate_up_cpu(
                x[0], p.w1[...], p.b1[...], p.w2[...], p.b2[...], p.hidden_activation is HiddenActivation.relu,
                self.threshold, self.capacity, gate_rows, self.up_rows[...], ffn.activation,
                gate_threshold=gate_threshold)
            return sparse_down(hidden, indices, count[0], ffn.w_down[...], implementation=Implementation.ffi)[None]
        logits = self.predictor(x)
        if x.shape[:-1] == (1, 1):  # one token: compute only the active rows
            indices, count = active_set(logits[0, 0], self.threshold, self.capacity)
            y = sparse_ffn(x[0], indices, count, gate_rows, self.up_rows[...], ffn.w_down[...], ffn.activation,
                           gate_threshold=gate_threshold, implementation=self.implementation)
            return y[None]
        # prefill / evaluation: the same neurons, computed densely
        up = x @ ffn.w_up[...]
        gate = x @ ffn.w_gate[...] if ffn.w_gate is not None else None
        hidden = thresholded_hidden(ffn.activation, gate, up, ffn.threshold, ffn.threshold_on)
        hidden = jnp.where(active_mask(logits, self.threshold, self.capacity), hidden, 0.0)
        return hidden @ ffn.w_down[...]


def predicted_counts(model, predictors: PredictorSet | Int4PredictorSet, tokens: Int[np.ndarray, "N S"],
                     batch_size: int = 4) -> np.ndarray:
    """Per layer, the predicted-active count of every token of `tokens` ([L, N*S])."""
    graphdef, params = split_capturing(model, [CapturePoint.ffn_input])
    predictor_def, predictor_state = nnx.split(predictors)

    @jax.jit
    def counts(params, predictor_state, batch):
        _, captured = capture_forward(nnx.merge(graphdef, params), batch)
        predictors = nnx.merge(predictor_def, predictor_state)
        thresholds = predictors.thresholds[...]
        return jnp.stack([jnp.sum(layer(x) > thresholds[i], axis=-1).reshape(-1)
                          for i, (layer, x) in enumerate(zip(predictors.layers, captured[CapturePoint.ffn_input],
                                                             strict=True))])

    out = [np.asarray(counts(params, predictor_state, jnp.asarray(tokens[i : i + batch_size])))
           for i in range(0, len(tokens) - batch_size + 1, batch_size)]
    if not out:
        raise ValueError(f"{len(tokens)} sequences make no batch of {batch_size}")
    return np.concatenate(out, axis=1)


def choose_capacities(counts: np.ndarray, d_ff: int, quantile: float, multiple: int) -> list[int]:
    """Per layer, the `quantile` of the predicted counts rounded up to `multiple` (at least `multiple`, at most
    d_ff)."""
    return [int(min(d_ff, max(multiple, math.ceil(np.quantile(c, quantile) / multiple) * multiple)))
            for c in counts]


def install(model, predictors: PredictorSet | Int4PredictorSet, capacities: list[int],
            implementation: Implementation | str) -> None:
    """Routes every FFN of `model` through its layer's SparseExecutor (`remove` undoes it)."""
    predictors.check_fits(model.config)
    if len(capacities) != model.config.n_layers:
        raise ValueError(f"{len(capacities)} capacities for a model of {model.config.n_layers} layers")
    thresholds = np.asarray(predictors.thresholds[...])
    for layer, block in enumerate(model.blocks):
        block.ffn.executor = SparseExecutor(block.ffn, predictors.layers[layer], thresholds[layer],
                                            capacities[layer], implementation)


def remove(model) -> None:
    for block in model.blocks:
        block.ffn.executor = None
