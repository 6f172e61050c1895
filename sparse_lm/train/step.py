"""The jitted training step: next-token loss, optional distillation from a teacher (KL on the logits, FFN-output
matching), optional L1 on FFN activations, gradient accumulation, optionally the FFN parameters only.

Legend: A micro-batches per step, B rows per micro-batch, L row length, N layers, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from sparse_lm.models.capture import capture_forward, set_capture
from sparse_lm.models.config import ModelConfig
from sparse_lm.models.ffn import CapturePoint
from sparse_lm.models.transformer import Transformer


class TrainState(NamedTuple):
    """Everything a checkpoint must hold to continue a run exactly."""

    step: Int[Array, ""]
    params: nnx.State
    opt_state: Any
    rng: Array  # raw key data (uint32); split once per step for stochastic regularisers


class StepMetrics(NamedTuple):
    loss: Float[Array, ""]  # mean next-token cross-entropy over the step's tokens
    l1: Float[Array, ""]  # mean |a| over layers (unscaled)
    grad_norm: Float[Array, ""]
    zero_fraction: Float[Array, " N"]  # per layer: share of hidden activations exactly 0
    kl: Float[Array, ""]  # mean KL(teacher || student) per token at the distillation temperature (0 without)
    ffn_match: Float[Array, ""]  # mean over layers of the relative FFN-output error against the teacher (0 without)


class Teacher(NamedTuple):
    """A frozen model run beside the student: its graph (capturing the FFN output when matched) and state."""

    graphdef: nnx.GraphDef
    state: nnx.State


def ffn_only(path, value) -> bool:
    """nnx filter of the FFN matrices (`train.trainable=ffn`)."""
    return isinstance(value, nnx.Param) and "ffn" in path


def split_trainable(params: nnx.State, trainable_ffn_only: bool) -> tuple[nnx.State, nnx.State]:
    """(trainable, frozen) parts of the parameters; frozen is empty when every parameter trains."""
    if not trainable_ffn_only:
        return params, nnx.State({})
    return nnx.split_state(params, ffn_only, ...)


def merge_trainable(trainable: nnx.State, frozen: nnx.State) -> nnx.State:
    if not jax.tree.leaves(frozen):
        return trainable
    return nnx.merge_state(trainable, frozen)


def split_model(
    model: Transformer, points: tuple[CapturePoint, ...] = (CapturePoint.ffn_hidden,)
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """graphdef (capturing `points`, by default the FFN hidden activation), parameters, the rest; `model` is
    unchanged."""
    previous = model.blocks[0].ffn.capture_points if len(model.blocks) else frozenset()
    set_capture(model, points)
    try:
        return nnx.split(model, nnx.Param, ...)
    finally:
        set_capture(model, previous)


def init_state(
    params: nnx.State, tx: optax.GradientTransformation, seed: int, trainable_ffn_only: bool = False
) -> TrainState:
    """The state at step 0; the optimiser holds state for the trainable parameters only."""
    trainable, _ = split_trainable(params, trainable_ffn_only)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(trainable), jax.random.key_data(jax.random.key(seed)))


def forward_captured(
    graphdef: nnx.GraphDef, inputs: Int[Array, "B L"], *states: nnx.State
) -> tuple[Float[Array, "B L V"], dict[CapturePoint, list[Array]]]:
    """Logits and, per captured point, each layer's value (an empty dict when the graph captures nothing)."""
    model = nnx.merge(graphdef, *states)
    if not (len(model.blocks) and model.blocks[0].ffn.capture_points):
        return model(inputs)[0], {}
    hidden, captured = capture_forward(model, inputs)
    return model.final_norm(hidden) @ model.unembed[...], captured


def forward_with_hidden(
    graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, inputs: Int[Array, "B L"]
) -> tuple[Float[Array, "B L V"], list[Float[Array, "B L F"]]]:
    """Logits and each layer's FFN hidden activation."""
    logits, captured = forward_captured(graphdef, inputs, params, rest)
    return logits, captured[CapturePoint.ffn_hidden]


def distillation_kl(
    student_logits: Float[Array, "B L V"], teacher_logits: Float[Array, "B L V"], temperature: float
) -> Float[Array, "B L"]:
    """T^2 KL(softmax(teacher/T) || softmax(student/T)) per position (T^2 keeps gradient scales comparable)."""
    teacher_log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    student_log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return temperature**2 * jnp.sum(jnp.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)


def ffn_match_error(
    student_out: list[Float[Array, "B L D"]], teacher_out: list[Float[Array, "B L D"]], weights: Float[Array, "B L 1"]
) -> Float[Array, " N"]:
    """Per layer: sum over weighted positions of ||y_s - y_t||^2 and of ||y_t||^2 (their ratio is the relative
    error; sums so that micro-batches add up)."""
    errors = jnp.stack([jnp.sum(jnp.square(s - t) * weights) for s, t in zip(student_out, teacher_out, strict=True)])
    norms = jnp.stack([jnp.sum(jnp.square(t) * weights) for t in teacher_out])
    return jnp.stack([errors, norms])


def make_train_step(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    tx: optax.GradientTransformation,
    config: ModelConfig,
    *,
    teacher: Teacher | None = None,
    kl_weight: float = 0.0,
    ce_weight: float = 1.0,
    temperature: float = 1.0,
    ffn_weight: float = 0.0,
    trainable_ffn_only: bool = False,
) -> Callable[..., tuple[TrainState, StepMetrics]]:
    """A jitted `step(state, tokens [A,B,L], mask [A,B,L], l1_coefficient, poison) -> (state, metrics)`.

    The loss is averaged over every predicted token of the step (not per micro-batch), so accumulating A
    micro-batches gives the gradient of the whole batch. `poison` multiplies the loss (1.0 normally; NaN
    for fault-injection tests). With a teacher, the objective is ce_weight * CE + kl_weight * KL + ffn_weight *
    FFN-match (see `config.DistillConfig`); the student's graphdef must capture the FFN output when ffn_weight > 0.
    With `trainable_ffn_only`, gradients and updates cover the FFN matrices alone.
    """
    if (kl_weight > 0 or ffn_weight > 0) and teacher is None:
        raise ValueError("distillation weights are set but no teacher was given")

    def micro_loss(trainable, frozen, tokens, mask, count, l1_coefficient, micro_batches):
        params = merge_trainable(trainable, frozen)
        logits, captured = forward_captured(graphdef, tokens[:, :-1], params, rest)
        hiddens = captured[CapturePoint.ffn_hidden]
        targets, valid = tokens[:, 1:], mask[:, 1:]
        weights = valid[..., None].astype(jnp.float32)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
        nll_sum = jnp.sum(jnp.where(valid, nll, 0.0))
        abs_means = jnp.stack([jnp.sum(jnp.abs(h) * weights) for h in hiddens]) / (count * hiddens[0].shape[-1])
        zeros = jnp.stack([jnp.sum((h == 0) * weights) for h in hiddens])
        # abs_means is this micro-batch's share of the step's mean |a|: the shares sum to the step's mean
        objective = ce_weight * nll_sum / count + l1_coefficient * jnp.mean(abs_means)
        kl_sum, match = jnp.zeros(()), jnp.zeros((2, config.n_layers))
        if teacher is not None:
            teacher_logits, teacher_captured = forward_captured(teacher.graphdef, tokens[:, :-1], teacher.state)
            teacher_logits = jax.lax.stop_gradient(teacher_logits)
            if kl_weight > 0:
                kl = distillation_kl(logits, teacher_logits, temperature)
                kl_sum = jnp.sum(jnp.where(valid, kl, 0.0))
                objective = objective + kl_weight * kl_sum / count
            if ffn_weight > 0:
                teacher_out = [jax.lax.stop_gradient(t) for t in teacher_captured[CapturePoint.ffn_output]]
                match = ffn_match_error(captured[CapturePoint.ffn_output], teacher_out, weights)
                # each micro-batch's relative error (its own teacher norm), averaged over the micro-batches
                relative = match[0] / jnp.maximum(match[1], 1e-30)
                objective = objective + ffn_weight * jnp.mean(relative) / micro_batches
        return objective, (nll_sum, jnp.mean(abs_means), zeros, kl_sum, match)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(
        state: TrainState,
        tokens: Int[Array, "A B L"],
        mask: Bool[Array, "A B L"],
        l1_coefficient: Float[Array, ""],
        poison: Float[Array, ""],
    ) -> tuple[TrainState, StepMetrics]:
        count = jnp.maximum(jnp.sum(mask[:, :, 1:]), 1).astype(jnp.float32)
        trainable, frozen = split_trainable(state.params, trainable_ffn_only)

        def accumulate(carry, micro):
            grads, nll_sum, l1_sum, zeros, kl_sum, match = carry
            (_, (nll, l1, z, kl, m)), g = grad_fn(
                trainable, frozen, micro[0], micro[1], count, l1_coefficient, tokens.shape[0]
            )
            return (jax.tree.map(jnp.add, grads, g), nll_sum + nll, l1_sum + l1, zeros + z, kl_sum + kl,
                    match + m), None

        zeros0 = jnp.zeros(config.n_layers, jnp.float32)
        init = (jax.tree.map(jnp.zeros_like, trainable), jnp.zeros(()), jnp.zeros(()), zeros0, jnp.zeros(()),
                jnp.zeros((2, config.n_layers)))
        if tokens.shape[0] == 1:  # no accumulation: skip the loop
            (grads, nll_sum, l1_sum, zeros, kl_sum, match), _ = accumulate(init, (tokens[0], mask[0]))
        else:
            (grads, nll_sum, l1_sum, zeros, kl_sum, match), _ = jax.lax.scan(accumulate, init, (tokens, mask))
        grads = jax.tree.map(lambda g: g * poison, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        params = merge_trainable(optax.apply_updates(trainable, updates), frozen)
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
        metrics = StepMetrics(
            loss=nll_sum / count * poison,
            l1=l1_sum,
            grad_norm=grad_norm,
            zero_fraction=zeros / (count * config.d_ff),
            kl=kl_sum / count,
            ffn_match=jnp.mean(match[0] / jnp.maximum(match[1], 1e-30)),
        )
        return TrainState(state.step + 1, params, opt_state, rng), metrics

    return jax.jit(step, donate_argnums=0)
