"""One FFN module for every activation pair (SwiGLU, ReGLU, dReLU, ReLU, ReLU^2).

Matrices are stored [in, out] like every matrix of the model: W_gate and W_up [D, F], W_down [F, D].
That is the layout XLA's CPU dot takes without copying (measured: a [out, in] layout made XLA transpose
weights on every decode step), and it keeps neuron i as row i of W_down. Sparse engines gather neuron rows
from the transposes of W_gate and W_up, made once when they are built.
Legend: B batch, L length, D d_model, F d_ff.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from sparse_lm.models.config import Activation, ThresholdTarget


class CapturePoint(str, enum.Enum):
    """Named FFN values a profiler can capture (off by default; a module with none set traces unchanged)."""

    ffn_input = "ffn_input"  # x entering the FFN, after its norm: [B, L, D]
    ffn_gate = "ffn_gate"  # gate pre-activation x W_gate (gated FFNs only): [B, L, F]
    ffn_hidden = "ffn_hidden"  # hidden activation a, after any threshold: [B, L, F]
    ffn_output = "ffn_output"  # the FFN's output a W_down (what distillation matches layer by layer): [B, L, D]


def activation_pair(
    activation: Activation, gate: Float[Array, "... F"] | None, up: Float[Array, "... F"]
) -> Float[Array, "... F"]:
    """The FFN hidden activation a from the gate and up pre-activations."""
    if activation is Activation.swiglu:
        return jax.nn.silu(gate) * up
    if activation is Activation.reglu:
        return jax.nn.relu(gate) * up
    if activation is Activation.drelu:
        return jax.nn.relu(gate) * jax.nn.relu(up)
    if activation is Activation.relu:
        return jax.nn.relu(up)
    if activation is Activation.relu2:
        return jnp.square(jax.nn.relu(up))
    raise ValueError(f"unknown activation {activation!r}")


def gate_activation(activation: Activation, gate: Float[Array, "... F"]) -> Float[Array, "... F"]:
    """The activated gate sigma(gate) of a gated FFN: silu for SwiGLU, relu for ReGLU and dReLU."""
    if activation is Activation.swiglu:
        return jax.nn.silu(gate)
    if activation in (Activation.reglu, Activation.drelu):
        return jax.nn.relu(gate)
    raise ValueError(f"activation {activation.value} has no gate")


def apply_threshold(hidden: Float[Array, "... F"], threshold: float | None) -> Float[Array, "... F"]:
    """Zeroes hidden activations with |a| <= threshold (no-op for None)."""
    if threshold is None:
        return hidden
    return jnp.where(jnp.abs(hidden) > threshold, hidden, jnp.zeros_like(hidden))


def thresholded_hidden(
    activation: Activation,
    gate: Float[Array, "... F"] | None,
    up: Float[Array, "... F"],
    threshold: float | None,
    threshold_on: ThresholdTarget,
) -> Float[Array, "... F"]:
    """The hidden activation with the threshold applied where `threshold_on` says.

    hidden: a is kept where |a| > t (TEAL). gate: a is kept where |sigma(gate)| > t, so whether a neuron fires
    depends on its gate row alone (CATS on SwiGLU; on ReGLU this is ProSparse's FATReLU, relu(g) kept only
    above t).
    """
    hidden = activation_pair(activation, gate, up)
    if threshold is None:
        return hidden
    if threshold_on is ThresholdTarget.gate:
        return jnp.where(jnp.abs(gate_activation(activation, gate)) > threshold, hidden, jnp.zeros_like(hidden))
    return apply_threshold(hidden, threshold)


def keep_top_k(hidden: Float[Array, "... F"], keep: int | None) -> Float[Array, "... F"]:
    """Keeps the `keep` largest |a| of each token's hidden activation and zeroes the rest (no-op for None).

    Ties at the k-th magnitude are all kept, so a token may keep slightly more than `keep` neurons.
    """
    if keep is None or keep >= hidden.shape[-1]:
        return hidden
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    magnitude = jnp.abs(hidden)
    kth = jax.lax.top_k(magnitude, keep)[0][..., -1:]
    return jnp.where(magnitude >= kth, hidden, jnp.zeros_like(hidden))


def ffn_hidden(
    x: Float[Array, "... D"],
    w_gate: Float[Array, "D F"] | None,
    w_up: Float[Array, "D F"],
    activation: Activation,
    threshold: float | None = None,
    threshold_on: ThresholdTarget = ThresholdTarget.hidden,
) -> Float[Array, "... F"]:
    """Hidden activation a = act(x W_gate, x W_up), thresholded when a threshold is set."""
    up = x @ w_up
    gate = x @ w_gate if w_gate is not None else None
    return thresholded_hidden(activation, gate, up, threshold, threshold_on)


class FFN(nnx.Module):
    """Feed-forward block y = a(x) W_down with a from `activation_pair`."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        activation: Activation,
        *,
        threshold: float | None = None,
        threshold_on: ThresholdTarget = ThresholdTarget.hidden,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        init_in = nnx.initializers.normal(stddev=d_model**-0.5)
        init_out = nnx.initializers.normal(stddev=d_ff**-0.5)
        self.activation = activation
        self.threshold = threshold
        self.threshold_on = ThresholdTarget(threshold_on)
        if self.threshold_on is ThresholdTarget.gate and not activation.gated:
            raise ValueError(f"model.ffn_threshold_on=gate needs a gated FFN, not {activation.value}")
        self.keep_top: int | None = None  # forced top-k sparsity (evaluation); None keeps every neuron
        # An activation predictor (logits over neurons from x) and its decision threshold: when set, the FFN
        # keeps only the neurons predicted to fire (the dense reference of a predictor-gated sparse FFN).
        self.predictor: nnx.Module | None = nnx.data(None)
        self.predictor_threshold: float = 0.0
        # Replaces this FFN's computation when set: `executor(ffn, x)` (the sparse engine installs one per layer:
        # predictor -> active neurons -> sparse kernels; sparse_lm.sparse).
        self.executor: nnx.Module | None = nnx.data(None)
        self.w_gate = nnx.Param(init_in(rngs.params(), (d_model, d_ff), dtype)) if activation.gated else None
        self.w_up = nnx.Param(init_in(rngs.params(), (d_model, d_ff), dtype))
        self.w_down = nnx.Param(init_out(rngs.params(), (d_ff, d_model), dtype))
        self.capture_points: frozenset[CapturePoint] = frozenset()

    def _capture(self, point: CapturePoint, value: Array) -> None:
        # Python-level test: with nothing captured the traced program has no trace of this.
        if point in self.capture_points:
            self.sow(nnx.Intermediate, point.value, value)

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        self._capture(CapturePoint.ffn_input, x)
        if self.executor is not None:
            return self.executor(self, x)
        up = x @ self.w_up[...]
        gate = x @ self.w_gate[...] if self.w_gate is not None else None
        if gate is not None:
            self._capture(CapturePoint.ffn_gate, gate)
        hidden = thresholded_hidden(self.activation, gate, up, self.threshold, self.threshold_on)
        hidden = keep_top_k(hidden, self.keep_top)
        if self.predictor is not None:
            predicted = self.predictor(x) > self.predictor_threshold
            hidden = jnp.where(predicted, hidden, jnp.zeros_like(hidden))
        self._capture(CapturePoint.ffn_hidden, hidden)
        out = hidden @ self.w_down[...]
        self._capture(CapturePoint.ffn_output, out)
        return out
