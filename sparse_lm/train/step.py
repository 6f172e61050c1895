"""The jitted training step: next-token loss, optional L1 on FFN activations, gradient accumulation.

Legend: A micro-batches per step, B rows per micro-batch, L row length, N layers.
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


def split_model(model: Transformer) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """graphdef (capturing the FFN hidden activation), trainable parameters, the rest; `model` is unchanged."""
    previous = model.blocks[0].ffn.capture_points if len(model.blocks) else frozenset()
    set_capture(model, [CapturePoint.ffn_hidden])
    try:
        return nnx.split(model, nnx.Param, ...)
    finally:
        set_capture(model, previous)


def init_state(params: nnx.State, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.key_data(jax.random.key(seed)))


def forward_with_hidden(
    graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, inputs: Int[Array, "B L"]
) -> tuple[Float[Array, "B L V"], list[Float[Array, "B L F"]]]:
    """Logits and each layer's FFN hidden activation."""
    model = nnx.merge(graphdef, params, rest)
    hidden, captured = capture_forward(model, inputs)
    logits = model.final_norm(hidden) @ model.unembed[...]
    return logits, captured[CapturePoint.ffn_hidden]


def make_train_step(
    graphdef: nnx.GraphDef, rest: nnx.State, tx: optax.GradientTransformation, config: ModelConfig
) -> Callable[..., tuple[TrainState, StepMetrics]]:
    """A jitted `step(state, tokens [A,B,L], mask [A,B,L], l1_coefficient, poison) -> (state, metrics)`.

    The loss is averaged over every predicted token of the step (not per micro-batch), so accumulating A
    micro-batches gives the gradient of the whole batch. `poison` multiplies the loss (1.0 normally; NaN
    for fault-injection tests).
    """

    def micro_loss(params, tokens, mask, count, l1_coefficient):
        logits, hiddens = forward_with_hidden(graphdef, params, rest, tokens[:, :-1])
        targets, valid = tokens[:, 1:], mask[:, 1:]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
        nll_sum = jnp.sum(jnp.where(valid, nll, 0.0))
        weights = valid[..., None].astype(jnp.float32)
        abs_means = jnp.stack([jnp.sum(jnp.abs(h) * weights) for h in hiddens]) / (count * hiddens[0].shape[-1])
        zeros = jnp.stack([jnp.sum((h == 0) * weights) for h in hiddens])
        # abs_means is this micro-batch's share of the step's mean |a|: the shares sum to the step's mean
        objective = nll_sum / count + l1_coefficient * jnp.mean(abs_means)
        return objective, (nll_sum, jnp.mean(abs_means), zeros)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(
        state: TrainState,
        tokens: Int[Array, "A B L"],
        mask: Bool[Array, "A B L"],
        l1_coefficient: Float[Array, ""],
        poison: Float[Array, ""],
    ) -> tuple[TrainState, StepMetrics]:
        count = jnp.maximum(jnp.sum(mask[:, :, 1:]), 1).astype(jnp.float32)

        def accumulate(carry, micro):
            grads, nll_sum, l1_sum, zeros = carry
            (_, (nll, l1, z)), g = grad_fn(state.params, micro[0], micro[1], count, l1_coefficient)
            return (jax.tree.map(jnp.add, grads, g), nll_sum + nll, l1_sum + l1, zeros + z), None

        zeros0 = jnp.zeros(config.n_layers, jnp.float32)
        init = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros(()), jnp.zeros(()), zeros0)
        if tokens.shape[0] == 1:  # no accumulation: skip the loop
            (grads, nll_sum, l1_sum, zeros), _ = accumulate(init, (tokens[0], mask[0]))
        else:
            (grads, nll_sum, l1_sum, zeros), _ = jax.lax.scan(accumulate, init, (tokens, mask))
        grads = jax.tree.map(lambda g: g * poison, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
        metrics = StepMetrics(
            loss=nll_sum / count * poison,
            l1=l1_sum,
            grad_norm=grad_norm,
            zero_fraction=zeros / (count * config.d_ff),
        )
        return TrainState(state.step + 1, params, opt_state, rng), metrics

    return jax.jit(step, donate_argnums=0)

