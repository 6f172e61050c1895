"""Training-free int4 predictors: each FFN's own gate/up rows in 4 bits decide which of its neurons fire.

For a ReLU-family FFN a neuron fires exactly when the pre-activations that gate it are positive (both for dReLU).
A 4-bit copy of those rows (kernels_pallas.quant_predict) estimates them at 1/7 of the float32 bytes; its error
is about the same for every row and token once the score is normalised, so each layer needs one threshold,
calibrated on training tokens to a target recall of the firing neurons. Unlike a low-rank predictor it has no
rank to run out of: the firing pattern of SmolLM2's 576-wide layers needs rank 400-768 for a linear predictor to
reach 1.25x the firing count (results/predictor_scaling_smollm2_drelu.json), which the 4-bit rows have in full.
Legend: N layers, T tokens, D d_model, F d_ff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from kernels_pallas.quant_predict import Int4Rows, decisive_projections, int4_scores_reference, quantize_rows
from sparse_lm.models.capture import capture_forward, split_capturing
from sparse_lm.models.config import Activation, ModelConfig, ThresholdTarget
from sparse_lm.models.ffn import CapturePoint
from sparse_lm.predictors.metrics import calibrate_threshold


class Int4Data(nnx.Variable):
    """Quantised weights: state, but never trained."""


def _rows(matrix, used: bool) -> tuple[Int4Data | None, ...]:
    if not used:
        return None, None, None
    q = quantize_rows(np.asarray(matrix).T)  # the model stores [D, F]; a neuron is a row of the transpose
    return Int4Data(q.packed), Int4Data(q.scales), Int4Data(q.inv_norms)


class Int4Predictor(nnx.Module):
    """One layer: scores over its F neurons from the FFN input; a neuron is predicted when its score passes the
    layer's threshold (held by the Int4PredictorSet)."""

    def __init__(self, ffn):
        self.activation = Activation(ffn.activation)
        uses_gate, uses_up = decisive_projections(self.activation)
        self.gate_packed, self.gate_scales, self.gate_inv_norms = _rows(ffn.w_gate[...] if uses_gate else None,
                                                                       uses_gate)
        self.up_packed, self.up_scales, self.up_inv_norms = _rows(ffn.w_up[...], uses_up)

    @property
    def gate(self) -> Int4Rows | None:
        if self.gate_packed is None:
            return None
        return Int4Rows(self.gate_packed[...], self.gate_scales[...], self.gate_inv_norms[...])

    @property
    def up(self) -> Int4Rows | None:
        if self.up_packed is None:
            return None
        return Int4Rows(self.up_packed[...], self.up_scales[...], self.up_inv_norms[...])

    def nbytes(self) -> int:
        return sum(int(a.size) * a.dtype.itemsize for rows in (self.gate, self.up) if rows is not None for a in rows)

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... F"]:
        return int4_scores_reference(x, self.gate, self.up)


class Int4PredictorSet(nnx.Module):
    """One Int4Predictor per layer of a model and per-layer thresholds on their scores (the interface of
    PredictorSet that the sparse engine uses: `layers`, `thresholds`, `check_fits`, `nbytes`)."""

    def __init__(self, model):
        config = model.config
        decisive_projections(config.activation)  # a clear error for an activation without exact zeros
        self.d_model, self.d_ff, self.n_layers = config.d_model, config.d_ff, config.n_layers
        self.layers = nnx.List([Int4Predictor(block.ffn) for block in model.blocks])
        self.thresholds = nnx.Variable(jnp.zeros((config.n_layers,)))

    def check_fits(self, config: ModelConfig) -> None:
        if (self.n_layers, self.d_model, self.d_ff) != (config.n_layers, config.d_model, config.d_ff):
            raise ValueError(
                f"int4 predictors cover {self.n_layers} layers of {self.d_model} -> {self.d_ff} but model "
                f"{config.name} has {config.n_layers} of {config.d_model} -> {config.d_ff}"
            )

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def _captured_batches(model, predictors, tokens: Int[np.ndarray, "N S"], batch_size: int, progress: bool, desc: str):
    """Per batch of rows: per layer (scores [T, F], gate pre-activation [T, F] or None, hidden [T, F]) on the host."""
    points = [CapturePoint.ffn_input, CapturePoint.ffn_hidden]
    gated = model.config.activation.gated
    if gated:
        points.append(CapturePoint.ffn_gate)
    graphdef, params = split_capturing(model, points)
    predictor_def, predictor_state = nnx.split(predictors)

    @jax.jit
    def run(params, predictor_state, batch):
        _, captured = capture_forward(nnx.merge(graphdef, params), batch)
        predictors = nnx.merge(predictor_def, predictor_state)
        out = []
        for i, layer in enumerate(predictors.layers):
            scores = layer(captured[CapturePoint.ffn_input][i]).reshape(-1, predictors.d_ff)
            gate = captured[CapturePoint.ffn_gate][i].reshape(scores.shape) if gated else None
            out.append((scores, gate, captured[CapturePoint.ffn_hidden][i].reshape(scores.shape)))
        return out

    if len(tokens) == 0:
        raise ValueError("no token sequences to run the int4 predictors on")
    batch_size = min(batch_size, len(tokens))
    starts = range(0, len(tokens) - batch_size + 1, batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress):
        yield jax.device_get(run(params, predictor_state, jnp.asarray(tokens[start : start + batch_size])))


def calibrate(model, predictors: Int4PredictorSet, tokens: Int[np.ndarray, "N S"], target_recall: float,
              batch_size: int = 4, progress: bool = False) -> np.ndarray:
    """Sets each layer's threshold to the largest one recalling `target_recall` of the firing (token, neuron)
    cells of `tokens` (a != 0, a the captured hidden activation: after the FFN's own threshold, so for a
    gate-thresholded ReGLU the cells with g > t, not g > 0); returns the thresholds [N]."""
    if not 0 < target_recall <= 1:
        raise ValueError(f"int4 predictor target recall must be in (0, 1], got {target_recall}")
    positives: list[list[np.ndarray]] = [[] for _ in range(predictors.n_layers)]
    for layers in _captured_batches(model, predictors, tokens, batch_size, progress, "int4 calibration"):
        for i, (scores, _, hidden) in enumerate(layers):
            positives[i].append(scores[hidden != 0])
    thresholds = np.array([calibrate_threshold(np.concatenate(p), np.ones(sum(map(len, p)), bool), target_recall)
                           for p in positives], np.float32)
    predictors.thresholds[...] = jnp.asarray(thresholds)
    return thresholds


def gate_floor(ffn) -> float:
    """The gate pre-activation a ReLU-gated neuron (ReGLU, dReLU) must exceed for the int4 engine to read its up
    row: 0, or max(0, t) for an FFN thresholded on its activated gate (FATReLU: relu(g) kept only above t)."""
    if ffn.threshold is None or ffn.threshold_on is not ThresholdTarget.gate:
        return 0.0
    return max(0.0, float(ffn.threshold))


def row_reads(model, predictors, tokens: Int[np.ndarray, "N S"], capacities: list[int], batch_size: int = 4,
              progress: bool = False) -> dict[str, np.ndarray]:
    """Per layer, the mean per token of: neurons predicted (after the capacity cap), those of them whose activated
    gate passes (relu(g) > 0 and above any gate threshold; gated FFNs, all of them otherwise) and those that fire,
    plus the recall of firing cells. These are the gate, up and down rows the int4 engine reads (the floor of its
    bytes per token)."""
    thresholds = np.asarray(predictors.thresholds[...])
    floors = [gate_floor(block.ffn) for block in model.blocks]
    sums = {k: np.zeros(predictors.n_layers) for k in ("predicted", "gate_passed", "fired_predicted", "fired")}
    cells = 0
    for layers in _captured_batches(model, predictors, tokens, batch_size, progress, "row reads"):
        cells += layers[0][0].shape[0]
        for i, (scores, gate, hidden) in enumerate(layers):
            predicted = scores > thresholds[i]
            predicted &= np.cumsum(predicted, axis=-1) <= capacities[i]
            fired = hidden != 0
            sums["predicted"][i] += predicted.sum()
            sums["gate_passed"][i] += (predicted & (gate > floors[i])).sum() if gate is not None else predicted.sum()
            sums["fired_predicted"][i] += (predicted & fired).sum()
            sums["fired"][i] += fired.sum()
    means = {k: v / cells for k, v in sums.items()}
    means["recall"] = sums["fired_predicted"] / np.maximum(sums["fired"], 1)
    return means
