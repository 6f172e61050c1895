"""Firing statistics on synthetic counts with hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sparse_lm.profiling.stats import (
    coverage_curve,
    coverage_fraction,
    coverage_model,
    coverage_per_layer,
    firing_rate,
    gini,
    hot_mask_global,
    hot_mask_per_layer,
    hot_share,
    lorenz_curve,
    model_firing_rate,
    sparsity,
    top_k_size,
    top_set_jaccard,
    top_set_overlap,
)

# Two layers of F = 4 neurons profiled on 10 tokens.
COUNTS = np.array([[6, 3, 1, 0], [2, 2, 2, 2]], dtype=np.int64)
TOKENS = 10


# ------------------------------------------------------------------------------------------------ firing rate


def test_firing_rate_sparsity_and_model_rate():
    np.testing.assert_allclose(firing_rate(COUNTS, TOKENS), [10 / 40, 8 / 40])
    np.testing.assert_allclose(sparsity(COUNTS, TOKENS), [30 / 40, 32 / 40])
    assert model_firing_rate(COUNTS, TOKENS) == pytest.approx(18 / 80)


def test_model_firing_rate_is_mean_of_layer_rates():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 101, size=(5, 64))
    assert model_firing_rate(counts, 100) == pytest.approx(firing_rate(counts, 100).mean())


def test_firing_rate_validation():
    with pytest.raises(ValueError, match="tokens"):
        firing_rate(COUNTS, 0)
    with pytest.raises(ValueError, match="tokens"):
        firing_rate(COUNTS, 2.5)
    with pytest.raises(ValueError, match="counts"):
        firing_rate(COUNTS, 5)  # a count of 6 > 5 tokens
    with pytest.raises(ValueError, match="counts"):
        firing_rate(COUNTS[0], TOKENS)  # 1-D
    with pytest.raises(ValueError, match="counts"):
        firing_rate(-COUNTS, TOKENS)
    with pytest.raises(ValueError, match="counts"):
        firing_rate(np.array([[1.0, np.nan]]), TOKENS)


# ------------------------------------------------------------------------------------------------ coverage


def test_coverage_curve_hand_computed():
    neuron_fraction, firing_fraction = coverage_curve(np.array([1, 6, 0, 3]))
    np.testing.assert_allclose(neuron_fraction, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(firing_fraction, [0, 0.6, 0.9, 1.0, 1.0])


def test_coverage_curve_of_equal_counts_is_the_diagonal():
    neuron_fraction, firing_fraction = coverage_curve(np.full(8, 5))
    np.testing.assert_allclose(firing_fraction, neuron_fraction)


def test_coverage_fraction_discrete_definition():
    counts = np.array([1, 6, 0, 3])  # top shares 0.6, 0.9, 1.0, 1.0
    assert coverage_fraction(counts, 0.6) == 0.25  # reached exactly by the top neuron
    assert coverage_fraction(counts, 0.61) == 0.5
    assert coverage_fraction(counts, 0.8) == 0.5
    assert coverage_fraction(counts, 0.95) == 0.75
    assert coverage_fraction(counts, 1.0) == 0.75  # the silent neuron is never needed


def test_coverage_fraction_exact_level_despite_float_products():
    # 0.7 * 10 = 7.000000000000001 in floats; the top 7 of 10 unit counts still hold exactly 70%.
    assert coverage_fraction(np.ones(10), 0.7) == 0.7
    assert coverage_fraction(np.ones(100), 0.29) == 0.29


def test_coverage_fraction_zipf_layer_matches_brute_force():
    rng = np.random.default_rng(1)
    counts = rng.zipf(1.8, size=500)
    shares = np.cumsum(np.sort(counts)[::-1]) / counts.sum()
    k = next(i + 1 for i, share in enumerate(shares) if share >= 0.8)
    assert coverage_fraction(counts, 0.8) == k / 500
    assert coverage_fraction(counts, 0.8) < 0.8  # skewed: fewer than 80% of neurons hold 80%


def test_coverage_of_all_zero_layer_is_nan():
    assert math.isnan(coverage_fraction(np.zeros(4), 0.8))
    assert np.all(np.isnan(coverage_curve(np.zeros(4))[1]))


def test_coverage_per_layer_and_model():
    np.testing.assert_allclose(coverage_per_layer(COUNTS, 0.5), [0.25, 0.5])
    counts = np.array([[6, 3, 1, 0], [0, 0, 0, 0]])
    per_layer = coverage_per_layer(counts, 0.8)
    assert per_layer[0] == 0.5 and math.isnan(per_layer[1])
    # Pooled: 8 neurons, top 2 (6 + 3 of 10 firings) reach 80%.
    assert coverage_model(counts, 0.8) == 2 / 8
    # Pooled COUNTS: sorted 6, 3, 2, 2, 2, 2, 1, 0 of 18; top 4 hold 13/18 < 0.8, top 5 hold 15/18.
    assert coverage_model(COUNTS, 0.8) == 5 / 8


@pytest.mark.parametrize("level", [0.0, -0.1, 1.5, math.nan])
def test_coverage_level_validation(level):
    with pytest.raises(ValueError, match="level"):
        coverage_fraction(np.array([1, 2]), level)
    with pytest.raises(ValueError, match="level"):
        coverage_per_layer(COUNTS, level)


def test_coverage_accepts_magnitude_sums():
    magnitudes = np.array([0.5, 4.0, 0.25, 0.25])  # top 1 holds 4/5
    assert coverage_fraction(magnitudes, 0.8) == 0.25


# ------------------------------------------------------------------------------------------------ inequality


def test_gini_known_values():
    assert gini(np.full(7, 3.0)) == pytest.approx(0.0, abs=1e-12)
    assert gini(np.array([0, 0, 0, 0, 9])) == pytest.approx(4 / 5)
    # [1, 2, 3, 4]: sum_i i x_(i) = 30, so 2 * 30 / (4 * 10) - 5 / 4 = 0.25.
    assert gini(np.array([4, 1, 3, 2])) == pytest.approx(0.25)
    assert math.isnan(gini(np.zeros(3)))


def test_gini_equals_mean_absolute_difference_formula():
    values = np.random.default_rng(2).exponential(size=200)
    pairwise = np.abs(values[:, None] - values[None, :]).sum() / (2 * values.size**2 * values.mean())
    assert gini(values) == pytest.approx(pairwise)


def test_lorenz_curve_hand_computed_and_consistent_with_gini():
    population, share = lorenz_curve(np.array([4, 1, 3, 2]))
    np.testing.assert_allclose(population, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(share, [0, 0.1, 0.3, 0.6, 1.0])
    values = np.random.default_rng(3).pareto(1.5, size=300)
    population, share = lorenz_curve(values)
    area = np.sum((share[1:] + share[:-1]) / 2 * np.diff(population))
    assert gini(values) == pytest.approx(1 - 2 * area)


def test_gini_validation():
    with pytest.raises(ValueError, match="values_1d"):
        gini(np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="values_1d"):
        gini(np.ones((2, 2)))
    with pytest.raises(ValueError, match="values_1d"):
        lorenz_curve(np.array([]))


# ------------------------------------------------------------------------------------------------ hot / cold


def test_top_k_size_is_floor_with_at_least_one():
    assert top_k_size(0.2, 1536) == 307  # 307.2
    assert top_k_size(0.29, 100) == 29  # 28.999999999999996 in floats
    assert top_k_size(0.01, 10) == 1
    assert top_k_size(1.0, 10) == 10


def test_hot_mask_per_layer_with_index_tie_break():
    counts = np.array([[5, 9, 5, 1, 5], [0, 0, 0, 0, 0]])
    mask = hot_mask_per_layer(counts, 0.4)  # floor(2.0) = 2 per layer
    expected = [[True, True, False, False, False], [True, True, False, False, False]]
    np.testing.assert_array_equal(mask, expected)
    assert hot_mask_per_layer(counts, 0.5).sum(axis=1).tolist() == [2, 2]  # floor(2.5)


def test_hot_mask_global_spans_layers():
    counts = np.array([[1, 8, 3], [8, 2, 7]])
    np.testing.assert_array_equal(hot_mask_global(counts, 3), [[False, True, False], [True, False, True]])
    np.testing.assert_array_equal(hot_mask_global(counts, 2), [[False, True, False], [True, False, False]])
    assert not hot_mask_global(counts, 0).any()
    assert hot_mask_global(counts, 6).all()


def test_hot_share():
    mask = hot_mask_per_layer(COUNTS, 0.5)  # layer 0: 6, 3; layer 1: first two 2s
    assert hot_share(COUNTS, mask) == pytest.approx((6 + 3 + 2 + 2) / 18)
    assert hot_share(COUNTS, hot_mask_global(COUNTS, 1)) == pytest.approx(6 / 18)
    assert math.isnan(hot_share(np.zeros((1, 2)), np.array([[True, False]])))


def test_hot_share_of_global_budget_equals_pooled_coverage_curve():
    counts = np.random.default_rng(4).zipf(2.0, size=(3, 50))
    _, firing_fraction = coverage_curve(counts.reshape(-1))
    for budget in (1, 15, 75, 150):
        assert hot_share(counts, hot_mask_global(counts, budget)) == pytest.approx(firing_fraction[budget])


def test_hot_mask_validation():
    with pytest.raises(ValueError, match="budget_fraction"):
        hot_mask_per_layer(COUNTS, 0.0)
    with pytest.raises(ValueError, match="budget_fraction"):
        hot_mask_per_layer(COUNTS, 1.01)
    with pytest.raises(ValueError, match="budget_neurons"):
        hot_mask_global(COUNTS, 9)
    with pytest.raises(ValueError, match="budget_neurons"):
        hot_mask_global(COUNTS, 2.0)
    with pytest.raises(ValueError, match="hot_mask"):
        hot_share(COUNTS, np.ones((2, 3), dtype=bool))
    with pytest.raises(ValueError, match="hot_mask"):
        hot_share(COUNTS, np.ones((2, 4)))


# ------------------------------------------------------------------------------------------------ stability


def test_top_set_overlap_and_jaccard_hand_computed():
    counts_a = np.array([[9, 8, 7, 6, 0, 0, 0, 0, 0, 0]])
    counts_b = np.array([[9, 0, 7, 0, 8, 6, 0, 0, 0, 0]])
    # fraction 0.4 -> k = 4: top_a = {0, 1, 2, 3}, top_b = {0, 4, 2, 5}; |intersection| = 2.
    np.testing.assert_allclose(top_set_overlap(counts_a, counts_b, 0.4), [0.5])
    np.testing.assert_allclose(top_set_jaccard(counts_a, counts_b, 0.4), [2 / 6])


def test_top_set_overlap_identical_permuted_and_per_layer():
    rng = np.random.default_rng(5)
    counts = rng.permutation(200).reshape(2, 100)  # distinct counts: no ties
    np.testing.assert_allclose(top_set_overlap(counts, counts), [1.0, 1.0])
    np.testing.assert_allclose(top_set_jaccard(counts, counts), [1.0, 1.0])
    reversed_order = counts.max() - counts  # top 20% of one is the bottom 20% of the other
    np.testing.assert_allclose(top_set_overlap(counts, reversed_order), [0.0, 0.0])
    mixed = np.stack([counts[0], reversed_order[1]])
    np.testing.assert_allclose(top_set_overlap(counts, mixed), [1.0, 0.0])


def test_top_set_validation():
    with pytest.raises(ValueError, match="counts_a"):
        top_set_overlap(COUNTS, COUNTS[:1])
    with pytest.raises(ValueError, match="counts_b"):
        top_set_overlap(COUNTS, -COUNTS)
    with pytest.raises(ValueError, match="fraction"):
        top_set_overlap(COUNTS, COUNTS, fraction=0)
