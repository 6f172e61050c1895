"""Schedules, the optimiser's decay mask, and the train step: accumulation, L1, sparsity, poisoning."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparse_lm.models.capture import capture_forward, set_capture
from sparse_lm.models.ffn import CapturePoint, keep_top_k
from sparse_lm.models.presets import TINY
from sparse_lm.models.transformer import Transformer
from sparse_lm.train import ActivationL1Config, OptimizerConfig
from sparse_lm.train.optim import l1_coefficient, learning_rate_schedule, make_optimizer
from sparse_lm.train.step import init_state, make_train_step, split_model


def test_learning_rate_warmup_then_cosine_to_floor():
    schedule = learning_rate_schedule(OptimizerConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(60)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-5)  # cosine midpoint
    assert float(schedule(110)) == pytest.approx(1e-4)


def test_l1_sine_schedule_rises_then_holds():
    cfg = ActivationL1Config(coefficient=0.2, schedule="sine", ramp_steps=4)
    values = [l1_coefficient(cfg, step) for step in range(6)]
    expected = [0.2 * math.sin(math.pi / 2 * min((s + 1) / 4, 1)) for s in range(6)]
    np.testing.assert_allclose(values, expected)
    assert values[3] == values[5] == pytest.approx(0.2)
    assert l1_coefficient(ActivationL1Config(coefficient=0.2, schedule="constant"), 0) == 0.2
    assert l1_coefficient(ActivationL1Config(), 7) == 0.0


def test_weight_decay_skips_norm_scales():
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    _, params, _ = split_model(model)
    tx = make_optimizer(OptimizerConfig(lr=1.0, warmup_steps=0, weight_decay=0.5, clip_norm=None), 10)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    # with zero gradients only decay moves parameters: matrices shrink, norm scales do not
    block = updates["blocks"][0]
    assert float(jnp.abs(block["attn_norm"]["scale"][...]).max()) == 0.0
    np.testing.assert_allclose(block["ffn"]["w_up"][...], -0.5 * params["blocks"][0]["ffn"]["w_up"][...], rtol=1e-6)


def _step_inputs(config, rows=4, length=17, seed=1):
    tokens = jax.random.randint(jax.random.key(seed), (rows, length), 0, config.vocab_size)
    mask = jnp.ones(tokens.shape, bool).at[-1, -5:].set(False)  # a padded tail
    return tokens, mask


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_accumulated_micro_batches_match_one_batch(activation):
    config = TINY.replace(activation=activation)
    tokens, mask = _step_inputs(config)
    results = []
    for accum in (1, 2):
        graphdef, params, rest = split_model(Transformer(config, rngs=nnx.Rngs(0)))
        tx = optax.sgd(1.0)  # updates linear in the gradient (Adam's first step is sign(g): too sensitive)
        step = make_train_step(graphdef, rest, tx, config)
        shape = (accum, 4 // accum, tokens.shape[1])
        state, metrics = step(
            init_state(params, tx, 0), tokens.reshape(shape), mask.reshape(shape), jnp.float32(0.1), jnp.float32(1)
        )
        results.append((state, metrics))
    (s1, m1), (s2, m2) = results
    np.testing.assert_allclose(m1.loss, m2.loss, rtol=1e-6)
    np.testing.assert_allclose(m1.l1, m2.l1, rtol=1e-6)
    np.testing.assert_allclose(m1.zero_fraction, m2.zero_fraction, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert int(s1.step) == int(s2.step) == 1


def test_step_metrics_match_a_direct_computation():
    config = TINY.replace(activation="relu")
    tokens, mask = _step_inputs(config)
    model = Transformer(config, rngs=nnx.Rngs(0))
    logits, _ = model(tokens[:, :-1])
    set_capture(model, [CapturePoint.ffn_hidden])
    _, captured = capture_forward(model, tokens[:, :-1])
    set_capture(model, [])
    graphdef, params, rest = split_model(model)
    hiddens = np.stack([np.asarray(h) for h in captured[CapturePoint.ffn_hidden]])  # [N, B, L, F]
    valid = np.asarray(mask[:, 1:])
    zero_expected = [(h[valid] == 0).mean() for h in hiddens]
    l1_expected = np.mean([np.abs(h[valid]).mean() for h in hiddens])
    logp = jax.nn.log_softmax(logits)
    nll = -np.take_along_axis(np.asarray(logp), np.asarray(tokens[:, 1:])[..., None], -1)[..., 0]
    tx = make_optimizer(OptimizerConfig(), 10)
    step = make_train_step(graphdef, rest, tx, config)
    _, metrics = step(init_state(params, tx, 0), tokens[None], mask[None], jnp.float32(0.0), jnp.float32(1))
    np.testing.assert_allclose(metrics.loss, nll[valid].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics.zero_fraction, zero_expected, rtol=1e-6)
    np.testing.assert_allclose(metrics.l1, l1_expected, rtol=1e-5)
    assert 0.3 < float(np.mean(zero_expected)) < 0.7  # relu at random init: about half are zero


def test_l1_penalty_lowers_activations():
    config = TINY.replace(activation="relu")
    tokens, mask = _step_inputs(config)
    l1_after = {}
    for coefficient in (0.0, 5.0):
        graphdef, params, rest = split_model(Transformer(config, rngs=nnx.Rngs(0)))
        tx = make_optimizer(OptimizerConfig(lr=1e-2, warmup_steps=0), 20)
        step = make_train_step(graphdef, rest, tx, config)
        state = init_state(params, tx, 0)
        for _ in range(5):
            state, metrics = step(state, tokens[None], mask[None], jnp.float32(coefficient), jnp.float32(1))
        l1_after[coefficient] = float(metrics.l1)
    assert l1_after[5.0] < 0.8 * l1_after[0.0]


def test_poisoned_step_reports_nan():
    tokens, mask = _step_inputs(TINY)
    graphdef, params, rest = split_model(Transformer(TINY, rngs=nnx.Rngs(0)))
    tx = make_optimizer(OptimizerConfig(), 10)
    _, metrics = make_train_step(graphdef, rest, tx, TINY)(
        init_state(params, tx, 0), tokens[None], mask[None], jnp.float32(0), jnp.float32(jnp.nan)
    )
    assert math.isnan(float(metrics.loss)) and math.isnan(float(metrics.grad_norm))


def test_keep_top_k_keeps_the_largest_magnitudes():
    hidden = jnp.array([[0.5, -3.0, 2.0, 0.1], [1.0, 0.0, 0.0, -0.2]])
    expected = np.array([[0.0, -3.0, 2.0, 0.0], [1.0, 0.0, 0.0, -0.2]], np.float32)
    np.testing.assert_array_equal(keep_top_k(hidden, 2), expected)
    np.testing.assert_array_equal(keep_top_k(hidden, None), hidden)
    np.testing.assert_array_equal(keep_top_k(hidden, 4), hidden)
    with pytest.raises(ValueError, match="keep"):
        keep_top_k(hidden, 0)
