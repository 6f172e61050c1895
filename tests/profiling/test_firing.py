"""Firing rules on hand-made activations, their config validation, and threshold calibration."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from sparse_lm.profiling.firing import FiringConfig, FiringRule, fire_mask
from sparse_lm.profiling.profiler import calibrate_thresholds

HIDDEN = jnp.array([[[0.5, -2.0, 0.0, 0.1, -0.05, 3.0]]])
GATE = jnp.array([[[1.0, -1.0, 0.2, -0.3, 0.0, 2.0]]])


def test_rules_hand_computed():
    assert fire_mask(FiringRule.positive, HIDDEN).tolist() == [[[True, False, False, True, False, True]]]
    assert fire_mask(FiringRule.nonzero, HIDDEN).tolist() == [[[True, True, False, True, True, True]]]
    assert fire_mask(FiringRule.magnitude, HIDDEN, threshold=0.1).tolist() == [
        [[True, True, False, False, False, True]]
    ]
    assert fire_mask(FiringRule.topk, HIDDEN, k=2).tolist() == [[[False, True, False, False, False, True]]]
    assert fire_mask(FiringRule.gate_positive, HIDDEN, gate=GATE).tolist() == [
        [[True, False, True, False, False, True]]
    ]


def test_topk_keeps_k_per_token():
    hidden = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 64)), jnp.float32)
    fired = fire_mask(FiringRule.topk, hidden, k=7)
    assert (np.asarray(fired).sum(-1) == 7).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rule": "sometimes"}, "firing.rule='sometimes'"),
        ({"target_sparsity": 1.0}, "firing.target_sparsity"),
        ({"target_sparsity": -0.1}, "firing.target_sparsity"),
        ({"rule": "topk", "thresholds": (0.1,)}, "only apply to rule=magnitude"),
        ({"thresholds": (-1.0,)}, "non-negative"),
    ],
)
def test_config_errors_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FiringConfig(**kwargs)


def test_missing_rule_inputs():
    with pytest.raises(ValueError, match="threshold"):
        fire_mask(FiringRule.magnitude, HIDDEN)
    with pytest.raises(ValueError, match="gate"):
        fire_mask(FiringRule.gate_positive, HIDDEN)
    with pytest.raises(ValueError, match="k <= 6"):
        fire_mask(FiringRule.topk, HIDDEN, k=7)


def test_topk_size_from_target():
    assert FiringConfig(rule="topk", target_sparsity=0.9).topk(1536) == 154
    assert FiringConfig(rule="topk", target_sparsity=0.0).topk(10) == 10


def test_calibration_reaches_the_target_sparsity():
    rng = np.random.default_rng(1)
    activations = np.abs(rng.normal(size=(3, 400, 50))) * np.array([1.0, 10.0, 0.1])[:, None, None]
    for target in (0.25, 0.5, 0.9):
        thresholds = calibrate_thresholds(activations, target)
        achieved = (activations <= thresholds[:, None, None]).mean(axis=(1, 2))
        np.testing.assert_allclose(achieved, target, atol=1e-4)
        assert thresholds[1] == pytest.approx(100 * thresholds[2], rel=0.05)  # scales with the layer
    assert calibrate_thresholds(activations, 0.0).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="target sparsity"):
        calibrate_thresholds(activations, 1.0)
