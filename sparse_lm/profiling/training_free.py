"""Training-free FFN sparsity rules: which neurons a token keeps, decided from a score per neuron.

Each rule scores every neuron of a token and keeps those whose score exceeds a per-layer threshold
(calibrated on other tokens to a target sparsity), except the statistical top-k, whose cutoff comes from
each token's own statistics:
- teal: |a|, the hidden activation's magnitude (TEAL, FFN-hidden part).
- cats: |sigma(gate)|, the activated gate (CATS): the gate row alone decides.
- stat_topk: (g - mean(g)) / std(g) over the token's gate pre-activations g, kept above z = Phi^-1(target)
  (the Gaussian top-k of Spark Transformer / Gemma 3n: the k largest without sorting). No calibration.
- wina: |a_i| * ||W_down[i]||, the activation weighted by the norm of the row it multiplies (WINA).
The rules run as FFN executors (`install_rule`), so the model itself is not changed.
`allocate_layer_sparsity` spreads a mean target over layers from measured per-layer error curves (greedy, one
grid step at a time where the error grows least) instead of a uniform target: the curves are either each layer's
FFN-output error (`error_curves`) or its measured effect on the loss (`loss_curves`).
Legend: T tokens, D d_model, F d_ff, N layers.
"""

from __future__ import annotations

import enum
import math
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from sparse_lm.models.capture import capture_forward, set_capture
from sparse_lm.models.ffn import FFN, CapturePoint, activation_pair, gate_activation
from sparse_lm.models.transformer import Transformer


class Rule(str, enum.Enum):
    teal = "teal"
    cats = "cats"
    stat_topk = "stat_topk"
    wina = "wina"

    def __str__(self) -> str:
        return self.value

    @property
    def calibrated(self) -> bool:
        return self is not Rule.stat_topk


def _pre_activations(ffn: FFN, x: Float[Array, "... D"]) -> tuple[Array | None, Array]:
    gate = x @ ffn.w_gate[...] if ffn.w_gate is not None else None
    return gate, x @ ffn.w_up[...]


def neuron_scores(rule: Rule, ffn: FFN, x: Float[Array, "... D"]) -> tuple[Float[Array, "... F"], Array]:
    """(score per neuron, hidden activation a) of the FFN on x; a neuron is kept where score > threshold."""
    gate, up = _pre_activations(ffn, x)
    hidden = activation_pair(ffn.activation, gate, up)
    if rule is Rule.teal:
        return jnp.abs(hidden), hidden
    if rule is Rule.wina:
        return jnp.abs(hidden) * jnp.linalg.norm(ffn.w_down[...], axis=-1), hidden
    if gate is None:
        raise ValueError(f"rule {rule.value} needs a gated FFN, not {ffn.activation.value}")
    if rule is Rule.cats:
        return jnp.abs(gate_activation(ffn.activation, gate)), hidden
    mean = jnp.mean(gate, axis=-1, keepdims=True)
    std = jnp.std(gate, axis=-1, keepdims=True)
    return (gate - mean) / jnp.maximum(std, 1e-12), hidden


def stat_topk_cutoff(target_sparsity: float) -> float:
    """z with Phi(z) = target: the share of a Gaussian's mass below the statistical top-k cutoff."""
    if not 0 < target_sparsity < 1:
        raise ValueError(f"target sparsity must be in (0, 1), got {target_sparsity}")
    return NormalDist().inv_cdf(target_sparsity)


class RuleExecutor(nnx.Module):
    """Runs an FFN keeping only the neurons whose `rule` score exceeds `threshold` (-inf keeps every neuron).

    The threshold is a state variable, not a constant of the program: changing it needs no recompilation.
    """

    def __init__(self, rule: Rule, threshold: float):
        self.rule = Rule(rule)
        self.threshold = nnx.Variable(jnp.float32(threshold))

    def keep_mask(self, ffn: FFN, x: Float[Array, "... D"]) -> Array:
        score, _ = neuron_scores(self.rule, ffn, x)
        return score > self.threshold[...]

    def __call__(self, ffn: FFN, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        score, hidden = neuron_scores(self.rule, ffn, x)
        return jnp.where(score > self.threshold[...], hidden, 0.0) @ ffn.w_down[...]


def install_rule(model: Transformer, rule: Rule | None, thresholds: np.ndarray | None) -> None:
    """Every FFN runs `rule` with its layer's threshold; rule None restores the plain FFNs."""
    for layer, block in enumerate(model.blocks):
        block.ffn.executor = None if rule is None else RuleExecutor(rule, float(thresholds[layer]))


def ffn_inputs(model: Transformer, rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Per layer, the FFN inputs x [T, D] of every token of `rows` under the plain (dense) model."""
    set_capture(model, (CapturePoint.ffn_input,))
    graphdef, state = nnx.split(model)
    set_capture(model, ())

    @jax.jit
    def inputs_of(state, tokens):
        _, captured = capture_forward(nnx.merge(graphdef, state), tokens)
        return [x.reshape(-1, x.shape[-1]) for x in captured[CapturePoint.ffn_input]]

    chunks = [inputs_of(state, rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    return [np.concatenate([np.asarray(c[layer]) for c in chunks]) for layer in range(model.config.n_layers)]


def _layer_scores(rule: Rule, ffn: FFN, x: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(lambda x: neuron_scores(rule, ffn, x)[0])(jnp.asarray(x)))


def calibrate_rule(
    rule: Rule, model: Transformer, inputs: list[np.ndarray], target: float | np.ndarray
) -> np.ndarray:
    """Per-layer thresholds with `target` (one value, or one per layer) of the calibration scores at or below."""
    targets = np.broadcast_to(np.asarray(target, dtype=np.float64), (model.config.n_layers,))
    if np.any((targets < 0) | (targets >= 1)):
        raise ValueError(f"target sparsities must be in [0, 1), got {targets}")
    if not rule.calibrated:
        return np.array([stat_topk_cutoff(t) if t > 0 else -math.inf for t in targets])
    thresholds = np.empty(model.config.n_layers)
    for layer, block in enumerate(model.blocks):
        if targets[layer] == 0:
            thresholds[layer] = -math.inf
            continue
        scores = _layer_scores(rule, block.ffn, inputs[layer])
        thresholds[layer] = np.quantile(scores, targets[layer], method="inverted_cdf")
    return thresholds


def error_curves(
    rule: Rule, model: Transformer, inputs: list[np.ndarray], grid: np.ndarray
) -> np.ndarray:
    """[N, len(grid)]: per layer, the mean squared change of the FFN output when `rule` keeps 1 - s of the
    neurons, s on `grid` (thresholds calibrated on the same inputs: these curves only rank layers)."""
    curves = np.zeros((model.config.n_layers, len(grid)))
    for layer, block in enumerate(model.blocks):
        ffn = block.ffn
        x = jnp.asarray(inputs[layer])

        @jax.jit
        def change(x, threshold, ffn=ffn):
            score, hidden = neuron_scores(rule, ffn, x)
            dropped = jnp.where(score > threshold, 0.0, hidden)
            return jnp.mean(jnp.sum(jnp.square(dropped @ ffn.w_down[...]), axis=-1))

        scores = np.asarray(jax.jit(lambda x, ffn=ffn: neuron_scores(rule, ffn, x)[0])(x))
        for j, s in enumerate(grid):
            threshold = -math.inf if s == 0 else float(np.quantile(scores, s, method="inverted_cdf"))
            curves[layer, j] = float(change(x, threshold))
    return curves


def loss_curves(
    rule: Rule, model: Transformer, inputs: list[np.ndarray], rows: np.ndarray, grid: np.ndarray, batch_size: int,
) -> np.ndarray:
    """[N, len(grid)]: per layer, the increase of the mean next-token loss on `rows` when `rule` keeps 1 - s of that
    layer's neurons (thresholds calibrated on `inputs`) and every other layer stays dense: each layer's measured
    sensitivity, on the same tokens for every point (so the differences are paired, not noise)."""
    n_layers = model.config.n_layers
    thresholds = np.stack([calibrate_rule(rule, model, inputs, s) for s in grid], axis=1)  # [N, G]
    install_rule(model, rule, np.full(n_layers, -math.inf))
    graphdef, state = nnx.split(model)

    @jax.jit
    def mean_nll(state, tokens):
        logits, _ = nnx.merge(graphdef, state)(tokens[:, :-1])
        log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(log_p, tokens[:, 1:, None], axis=-1))

    def loss() -> float:
        state = nnx.state(model)
        return float(np.mean([float(mean_nll(state, rows[i : i + batch_size]))
                              for i in range(0, len(rows), batch_size)]))

    base = loss()
    curves = np.zeros((n_layers, len(grid)))
    for layer, block in enumerate(model.blocks):
        for j in range(len(grid)):
            block.ffn.executor.threshold[...] = jnp.float32(thresholds[layer, j])
            curves[layer, j] = loss() - base if grid[j] > 0 else 0.0
        block.ffn.executor.threshold[...] = jnp.float32(-math.inf)
    install_rule(model, None, None)
    return curves


def allocate_layer_sparsity(curves: np.ndarray, grid: np.ndarray, target: float) -> np.ndarray:
    """Per-layer sparsities on `grid` whose mean reaches `target`, raising one layer a grid step at a time where
    the error grows least (optimal for convex, additive curves)."""
    if not 0 <= target < grid[-1]:
        raise ValueError(f"target {target} must be in [0, {grid[-1]})")
    position = np.zeros(len(curves), dtype=int)
    while grid[position].mean() < target - 1e-12:
        movable = position < len(grid) - 1
        increase = np.where(movable, curves[np.arange(len(curves)), np.minimum(position + 1, len(grid) - 1)]
                            - curves[np.arange(len(curves)), position], np.inf)
        position[int(np.argmin(increase))] += 1
    return grid[position]
