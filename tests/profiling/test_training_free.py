"""Training-free sparsity rules: scores against hand computation, calibration, greedy allocation, executors."""

from __future__ import annotations

import math
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm.models.presets import TINY
from sparse_lm.models.transformer import Transformer
from sparse_lm.profiling.training_free import (
    Rule,
    allocate_layer_sparsity,
    calibrate_rule,
    error_curves,
    ffn_inputs,
    install_rule,
    neuron_scores,
    stat_topk_cutoff,
)


@pytest.fixture
def model():
    return Transformer(TINY, rngs=nnx.Rngs(0))


def test_scores_match_hand_computation(model):
    ffn = model.blocks[0].ffn
    x = jax.random.normal(jax.random.key(1), (3, TINY.d_model))
    gate, up = np.asarray(x @ ffn.w_gate[...]), np.asarray(x @ ffn.w_up[...])
    silu = gate / (1 + np.exp(-gate))
    hidden = silu * up
    row_norms = np.sqrt((np.asarray(ffn.w_down[...]) ** 2).sum(axis=1))
    np.testing.assert_allclose(neuron_scores(Rule.teal, ffn, x)[0], np.abs(hidden), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(neuron_scores(Rule.cats, ffn, x)[0], np.abs(silu), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(neuron_scores(Rule.wina, ffn, x)[0], np.abs(hidden) * row_norms, rtol=1e-5,
                               atol=1e-7)
    z = (gate - gate.mean(-1, keepdims=True)) / gate.std(-1, keepdims=True)
    np.testing.assert_allclose(neuron_scores(Rule.stat_topk, ffn, x)[0], z, rtol=1e-4, atol=1e-5)
    assert stat_topk_cutoff(0.8) == pytest.approx(0.8416212, rel=1e-6)
    assert stat_topk_cutoff(0.5) == pytest.approx(0.0, abs=1e-12)


def test_calibrated_thresholds_drop_the_target_share_and_the_executor_applies_them(model):
    rows = np.asarray(jax.random.randint(jax.random.key(2), (4, 32), 0, TINY.vocab_size))
    inputs = ffn_inputs(model, rows, batch_size=2)
    assert [x.shape for x in inputs] == [(128, TINY.d_model)] * TINY.n_layers
    for rule in (Rule.teal, Rule.cats, Rule.wina):
        thresholds = calibrate_rule(rule, model, inputs, 0.75)
        for layer, block in enumerate(model.blocks):
            score = np.asarray(neuron_scores(rule, block.ffn, jnp.asarray(inputs[layer]))[0])
            assert np.mean(score <= thresholds[layer]) == pytest.approx(0.75, abs=0.01)
    # the executor: the dropped neurons are those at or below the threshold, the rest equal the dense FFN
    thresholds = calibrate_rule(Rule.teal, model, inputs, [0.5, 0.9])
    ffn, x = model.blocks[1].ffn, jnp.asarray(inputs[1][:8])
    dense_hidden = neuron_scores(Rule.teal, ffn, x)[1]
    install_rule(model, Rule.teal, thresholds)
    expected = jnp.where(jnp.abs(dense_hidden) > thresholds[1], dense_hidden, 0.0) @ ffn.w_down[...]
    np.testing.assert_allclose(ffn(x), expected, rtol=1e-5, atol=1e-6)
    assert float(jnp.mean(ffn.executor.keep_mask(ffn, jnp.asarray(inputs[1])))) == pytest.approx(0.1, abs=0.01)
    install_rule(model, None, None)
    np.testing.assert_allclose(ffn(x), dense_hidden @ ffn.w_down[...], rtol=1e-5, atol=1e-6)
    # stat_topk: no calibration, the Gaussian cutoff; target 0 keeps everything
    np.testing.assert_allclose(calibrate_rule(Rule.stat_topk, model, inputs, 0.8),
                               [NormalDist().inv_cdf(0.8)] * 2)
    assert calibrate_rule(Rule.teal, model, inputs, 0.0).tolist() == [-math.inf, -math.inf]


def test_greedy_allocation_gives_sparsity_to_the_layers_that_lose_least():
    grid = np.array([0.0, 0.25, 0.5, 0.75, 0.9])
    cheap = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    costly = np.array([0.0, 1.0, 2.0, 4.0, 8.0])
    allocation = allocate_layer_sparsity(np.stack([cheap, costly]), grid, 0.45)
    np.testing.assert_allclose(allocation, [0.9, 0.0])
    # convex curves with equal costs end up even
    even = allocate_layer_sparsity(np.stack([costly, costly]), grid, 0.5)
    np.testing.assert_allclose(even, [0.5, 0.5])
    with pytest.raises(ValueError):
        allocate_layer_sparsity(np.stack([cheap, costly]), grid, 0.95)


def test_loss_curves_measure_one_layer_at_a_time_and_leave_the_model_dense(model):
    from sparse_lm.profiling.training_free import loss_curves

    rows = np.asarray(jax.random.randint(jax.random.key(4), (2, 33), 0, TINY.vocab_size))
    inputs = ffn_inputs(model, rows, batch_size=2)
    grid = np.array([0.0, 0.5, 0.95])
    curves = loss_curves(Rule.teal, model, inputs, rows, grid, batch_size=2)
    assert curves.shape == (2, 3) and np.all(curves[:, 0] == 0.0)
    assert np.all(np.abs(curves[:, 2]) > 1e-5)  # dropping 95% of a layer's neurons moves the loss
    assert all(block.ffn.executor is None for block in model.blocks)
    # layer 1 at 95% by hand: its threshold alone, the other layer dense
    thresholds = calibrate_rule(Rule.teal, model, inputs, 0.95)
    install_rule(model, Rule.teal, np.array([-math.inf, thresholds[1]]))

    def loss():
        logits, _ = model(jnp.asarray(rows[:, :-1]))
        return float(-jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(rows[:, 1:, None]), -1)))

    sparse_loss = loss()
    install_rule(model, None, None)
    np.testing.assert_allclose(curves[1, 2], sparse_loss - loss(), rtol=1e-4, atol=1e-6)


def test_error_curves_start_at_zero_and_grow(model):
    rows = np.asarray(jax.random.randint(jax.random.key(3), (2, 32), 0, TINY.vocab_size))
    inputs = ffn_inputs(model, rows, batch_size=2)
    grid = np.array([0.0, 0.5, 0.9])
    curves = error_curves(Rule.teal, model, inputs, grid)
    assert curves.shape == (2, 3)
    np.testing.assert_allclose(curves[:, 0], 0.0, atol=1e-12)
    assert np.all(np.diff(curves, axis=1) > 0)
