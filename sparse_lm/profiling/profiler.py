"""Streaming activation profiler: batched, jitted, checkpointed and resumable.

Each jitted step runs the blocks with the FFN capture points on, applies the firing rule and reduces to
per-neuron counts and |a| sums inside the program, so only [L, F] arrays leave it. Batches come in a fixed
order; a checkpoint every N batches holds the counts and the batch index, so an interrupted run resumes
where it stopped and ends with exactly the counts of an uninterrupted one.
Legend: B batch, S sequence length, L layers, F d_ff.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from sparse_lm.models.capture import capture_forward, set_capture
from sparse_lm.models.config import Activation, ThresholdTarget
from sparse_lm.models.ffn import CapturePoint, gate_activation
from sparse_lm.models.transformer import Transformer
from sparse_lm.profiling.counts import FiringCounts
from sparse_lm.profiling.firing import FiringConfig, FiringRule, fire_mask

log = logging.getLogger(__name__)


def make_profile_step(model: Transformer, firing: FiringConfig, extra_rules: tuple[FiringRule, ...] = ()) -> Callable:
    """A jitted `step(state, tokens [B, S], thresholds [L])` returning counts [L, F] int32, abs_sum [L, F] f32
    and counts [E, L, F] of `extra_rules` (threshold-free rules; topk keeps the fraction `firing` sets)."""
    rules = (firing.rule, *extra_rules)
    set_capture(model, frozenset().union(*(rule.capture_points for rule in rules)))
    graphdef, _ = nnx.split(model)
    k = firing.topk(model.config.d_ff)

    @jax.jit
    def step(state, tokens: Int[jax.Array, "B S"], thresholds: Float[jax.Array, " L"]):
        _, captured = capture_forward(nnx.merge(graphdef, state), tokens)
        counts = [[] for _ in rules]
        abs_sums = []
        for layer, hidden in enumerate(captured[CapturePoint.ffn_hidden]):
            gate = captured[CapturePoint.ffn_gate][layer] if CapturePoint.ffn_gate in captured else None
            for index, rule in enumerate(rules):
                fired = fire_mask(rule, hidden, gate=gate, threshold=thresholds[layer], k=k)
                counts[index].append(jnp.sum(fired, axis=(0, 1), dtype=jnp.int32))
            abs_sums.append(jnp.sum(jnp.abs(hidden), axis=(0, 1), dtype=jnp.float32))
        stacked = [jnp.stack(per_layer) for per_layer in counts]
        extra = jnp.stack(stacked[1:]) if extra_rules else jnp.zeros((0,), jnp.int32)
        return stacked[0], jnp.stack(abs_sums), extra

    return step


def profile_sequences(
    model: Transformer,
    sequences: Int[np.ndarray, "N S"],
    firing: FiringConfig,
    thresholds: Float[np.ndarray, " L"],
    *,
    batch_size: int,
    checkpoint: Path | None = None,
    checkpoint_every: int = 16,
    fingerprint: str = "",
    progress: bool = True,
    stop_after_batches: int | None = None,
    extra_rules: tuple[FiringRule, ...] = (),
) -> tuple[FiringCounts, float, int]:
    """Firing counts over `sequences` (rows in order, `batch_size` at a time; a last partial batch is dropped).

    Args:
      checkpoint: counts file to resume from and to save every `checkpoint_every` batches and at the end.
      fingerprint: identifies the run; a checkpoint with another fingerprint is refused.
      stop_after_batches: stop (after checkpointing) once this many batches are done: simulates an
        interruption in tests.
      extra_rules: threshold-free rules counted in the same pass (`FiringCounts.extra`).

    Returns:
      (counts, seconds spent in the timed profiling steps of this call, number of those steps); the first
      step of a call compiles and is not timed.
    """
    n_layers, d_ff = model.config.n_layers, model.config.d_ff
    if thresholds.shape != (n_layers,):
        raise ValueError(f"thresholds have shape {thresholds.shape}, the model has {n_layers} layers")
    n_batches = len(sequences) // batch_size
    if n_batches == 0:
        raise ValueError(f"{len(sequences)} sequences make no batch of {batch_size}")
    names = [rule.value for rule in extra_rules]
    state = FiringCounts.zeros(n_layers, d_ff, fingerprint, names)
    if checkpoint is not None and checkpoint.exists():
        state = FiringCounts.load(checkpoint)
        if state.fingerprint != fingerprint:
            raise ValueError(
                f"{checkpoint} belongs to another profile (fingerprint {state.fingerprint}, this run {fingerprint}); "
                "use a fresh run directory"
            )
        log.info("resuming %s at batch %d of %d", checkpoint, state.batches, n_batches)
    step = make_profile_step(model, firing, extra_rules)
    params = nnx.state(model)
    device_thresholds = jnp.asarray(thresholds, jnp.float32)
    seconds, timed = 0.0, 0
    bar = tqdm(total=n_batches, initial=state.batches, desc="profile", unit="batch", disable=not progress)
    first_index = state.batches
    for index in range(state.batches, n_batches):
        tokens = sequences[index * batch_size : (index + 1) * batch_size]
        start = time.perf_counter()
        counts, abs_sum, extra = step(params, tokens, device_thresholds)
        counts, abs_sum, extra = np.asarray(counts), np.asarray(abs_sum), np.asarray(extra)
        if index != first_index:  # the first step of a call compiles
            seconds += time.perf_counter() - start
            timed += 1
        state.add(counts, abs_sum, tokens.size, dict(zip(names, extra, strict=False)))
        bar.update(1)
        done = state.batches
        if checkpoint is not None and (done % checkpoint_every == 0 or done == n_batches):
            state.save(checkpoint)
        if stop_after_batches is not None and done >= stop_after_batches:
            if checkpoint is not None:
                state.save(checkpoint)
            break
    bar.close()
    set_capture(model, ())
    return state, seconds, timed


def collect_abs_activations(
    model: Transformer,
    sequences: Int[np.ndarray, "N S"],
    n_tokens: int,
    batch_size: int,
    of: ThresholdTarget = ThresholdTarget.hidden,
    gate_of: Activation | None = None,
) -> Float[np.ndarray, "L T F"]:
    """Per layer, for the first `n_tokens` tokens of `sequences`, what a threshold is compared with (for calibration).

    of=hidden: |a| of every neuron. of=gate: |sigma(gate)| with sigma the gate activation of `gate_of` (default the
    model's own), e.g. the ReGLU gate relu(g) of a SwiGLU model about to be ReLU-fied.
    """
    point = CapturePoint.ffn_gate if of is ThresholdTarget.gate else CapturePoint.ffn_hidden
    activation = gate_of or model.config.activation
    set_capture(model, (point,))
    graphdef, params = nnx.split(model)

    @jax.jit
    def values_of(params, tokens):
        _, captured = capture_forward(nnx.merge(graphdef, params), tokens)
        values = captured[point]
        if of is ThresholdTarget.gate:
            values = [gate_activation(activation, g) for g in values]
        return jnp.stack([jnp.abs(h).reshape(-1, h.shape[-1]) for h in values])

    chunks, seen = [], 0
    for first in range(0, len(sequences), batch_size):
        if seen >= n_tokens:
            break
        batch = sequences[first : first + batch_size]
        chunks.append(np.asarray(values_of(params, batch)))
        seen += batch.size
    set_capture(model, ())
    if not chunks:
        raise ValueError("no calibration tokens")
    return np.concatenate(chunks, axis=1)[:, :n_tokens]


def calibrate_thresholds(abs_activations: Float[np.ndarray, "L T F"], target_sparsity: float) -> np.ndarray:
    """Per-layer t with a fraction `target_sparsity` of calibration |a| values at or below it.

    Firing is |a| > t, so the calibration tokens then have exactly that sparsity (up to ties); target 0
    gives t = 0 (every nonzero activation fires).
    """
    if not 0 <= target_sparsity < 1:
        raise ValueError(f"target sparsity must be in [0, 1), got {target_sparsity}")
    if target_sparsity == 0:
        return np.zeros(abs_activations.shape[0])
    flat = abs_activations.reshape(abs_activations.shape[0], -1)
    return np.quantile(flat, target_sparsity, axis=1, method="inverted_cdf").astype(np.float64)
