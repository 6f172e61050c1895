"""Neuron placement: the synthetic profile, PowerInfer's program against greedy, and the gpu-index file."""

from __future__ import annotations

import time

import numpy as np
import pytest

from sparse_lm.offload.gpu_index import read_gpu_index, write_gpu_index
from sparse_lm.offload.placement import (
    PlacementInfeasible,
    greedy_placement,
    group_neurons,
    ilp_placement,
    min_fast_neurons,
    place,
)
from sparse_lm.offload.profile_synth import (
    exponent_for_hot_share,
    pareto_quantiles,
    scale_to_mean,
    synthetic_frequencies,
    top_share,
)

# Two layers of four neurons: with room for three, the top three are 0.9 (layer 0), 0.6 and 0.55 (layer 1).
SMALL = np.array([[0.9, 0.1, 0.5, 0.05], [0.6, 0.55, 0.02, 0.01]])


def test_pareto_quantiles_by_hand():
    # alpha 3: x = tail^(-1/2) at tails 0.25 and 0.75
    np.testing.assert_allclose(pareto_quantiles(2, 3.0), [2.0, 1 / np.sqrt(0.75)])


def test_scale_to_mean_clips_at_one():
    # min(4s, 1) + min(s, 1) = 1 at s = 0.2; with mean 0.75 the first clips: 1 + s = 1.5
    np.testing.assert_allclose(scale_to_mean(np.array([4.0, 1.0]), 0.5), [0.8, 0.2])
    np.testing.assert_allclose(scale_to_mean(np.array([4.0, 1.0]), 0.75), [1.0, 0.5])


def test_synthetic_profile_means_and_hot_share():
    fractions = [0.03, 0.1, 0.3]
    frequencies = synthetic_frequencies(3, 4096, active_fraction=fractions, hot_share=(0.26, 0.8), seed=1)
    np.testing.assert_allclose(frequencies.mean(axis=1), fractions, rtol=1e-9)
    assert frequencies.max() <= 1.0 and frequencies.min() > 0
    for row in frequencies:
        assert top_share(row, 0.26) == pytest.approx(0.8, abs=1e-3)
    # a heavier tail (smaller exponent) concentrates more firings in the top neurons
    light = synthetic_frequencies(1, 4096, active_fraction=0.1, exponent=4.0)
    heavy = synthetic_frequencies(1, 4096, active_fraction=0.1, exponent=2.0)
    assert top_share(heavy[0], 0.2) > top_share(light[0], 0.2)
    # hot neurons are shuffled over indices, not index-ordered
    assert np.argmax(frequencies[0]) != 0 or np.argmax(frequencies[1]) != 0


def test_synthetic_profile_errors():
    with pytest.raises(ValueError, match="exactly one of exponent and hot_share"):
        synthetic_frequencies(2, 8, active_fraction=0.1)
    with pytest.raises(ValueError, match="one value or 2"):
        synthetic_frequencies(2, 8, active_fraction=[0.1, 0.2, 0.3], exponent=2.0)
    with pytest.raises(ValueError, match="exponent must be a number > 1"):
        synthetic_frequencies(2, 8, active_fraction=0.1, exponent=0.5)
    with pytest.raises(ValueError, match="not reachable"):
        exponent_for_hot_share(64, 0.5, 0.26, 0.999)


def test_groups_are_hottest_first():
    groups = group_neurons(np.array([[0.1, 0.4, 0.3, 0.2, 0.5]]), 2)
    np.testing.assert_array_equal(groups.order, [[4, 1, 2, 3, 0]])
    np.testing.assert_allclose(groups.value, [[0.9, 0.5, 0.1]])
    np.testing.assert_array_equal(groups.count, [[2, 2, 1]])
    np.testing.assert_array_equal(groups.mask(np.array([1])), [[False, True, False, False, True]])


def test_small_problem_by_hand():
    # no per-layer bound: the top three
    for solver in (ilp_placement, greedy_placement):
        placement = solver(SMALL, 3, group_size=1)
        assert placement.objective == pytest.approx(0.9 + 0.6 + 0.55)
    # at least 2 per used layer: layer 0 alone with three neurons (1.5) beats layer 1 with three (1.17)
    ilp = ilp_placement(SMALL, 3, group_size=1, min_neurons=2)
    assert ilp.objective == pytest.approx(1.5) and ilp.status == "optimal" and ilp.mip_gap == 0
    np.testing.assert_array_equal(ilp.mask, [[True, True, True, False], [False] * 4])
    # greedy takes 0.9, 0.6, 0.55, drops layer 0 (one neuron) and refills layer 1
    greedy = greedy_placement(SMALL, 3, group_size=1, min_neurons=2)
    assert greedy.objective == pytest.approx(0.6 + 0.55 + 0.02)
    np.testing.assert_allclose(ilp.fast_firing_share(SMALL), [1.5 / 1.55, 0.0])


@pytest.mark.parametrize("min_neurons", [0, 96, 700])
def test_ilp_never_below_greedy(min_neurons):
    rng = np.random.default_rng(min_neurons)
    frequencies = synthetic_frequencies(6, 1024, active_fraction=rng.uniform(0.05, 0.3, 6), exponent=2.5, seed=3)
    for fraction in (0.02, 0.1, 0.3, 0.7):
        capacity = int(fraction * frequencies.size)
        ilp = ilp_placement(frequencies, capacity, group_size=32, min_neurons=min_neurons)
        greedy = greedy_placement(frequencies, capacity, group_size=32, min_neurons=min_neurons)
        assert ilp.objective >= greedy.objective - 1e-9
        for placement in (ilp, greedy):
            fast = placement.fast_neurons
            assert fast.sum() <= capacity
            assert np.all((fast == 0) | (fast >= min_neurons))
            # each layer's fast set is its hottest neurons
            for layer in range(6):
                if 0 < fast[layer] < frequencies.shape[1]:
                    assert frequencies[layer, placement.mask[layer]].min() >= frequencies[
                        layer, ~placement.mask[layer]
                    ].max()
            assert placement.objective == pytest.approx(frequencies[placement.mask].sum())


def test_llama7b_shape_solves_quickly():
    rng = np.random.default_rng(0)
    frequencies = synthetic_frequencies(32, 11008, active_fraction=rng.uniform(0.05, 0.2, 32), exponent=2.85)
    start = time.perf_counter()
    placement = ilp_placement(frequencies, int(0.05 * frequencies.size), group_size=64, min_neurons=2000)
    assert time.perf_counter() - start < 10
    assert placement.status == "optimal"
    greedy = greedy_placement(frequencies, int(0.05 * frequencies.size), group_size=64, min_neurons=2000)
    assert placement.objective > greedy.objective


def test_infeasible_budgets_name_the_bound():
    with pytest.raises(PlacementInfeasible, match="exceeds the budget"):
        ilp_placement(SMALL, -5)
    with pytest.raises(PlacementInfeasible, match="min_neurons 9 exceeds the 4 neurons"):
        greedy_placement(SMALL, 3, min_neurons=9)
    with pytest.raises(ValueError, match="solver must be one of"):
        place(SMALL, 3, solver="simplex")


def test_min_fast_neurons_by_hand():
    # one neuron: 1 s on the fast tier, 2 s on the slow one; a sync of 3 s pays after 3 neurons, 2.5 s after 3
    assert min_fast_neurons(100, 100, 50, 3.0) == 3
    assert min_fast_neurons(100, 100, 50, 2.5) == 3
    assert min_fast_neurons(100, 100, 50, 0.0) == 0
    with pytest.raises(ValueError, match="must be faster"):
        min_fast_neurons(100, 50, 100, 1.0)


def test_gpu_index_round_trip(tmp_path):
    mask = np.random.default_rng(0).random((3, 100)) < 0.3
    mask[2] = False
    path = write_gpu_index(tmp_path / "model.gguf.generated.gpuidx", mask, 24 << 30)
    assert path.read_bytes()[:8] == b"PWRI\x03\x00\x00\x00"
    read_mask, capacity = read_gpu_index(path)
    np.testing.assert_array_equal(read_mask, mask)
    assert capacity == 24 << 30
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_gpu_index_rejects_a_plain_gguf(tmp_path):
    path = write_gpu_index(tmp_path / "x.gpuidx", np.ones((1, 8), bool), 1)
    data = bytearray(path.read_bytes())
    data[:4] = b"GGUF"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="not a PowerInfer gpu-index file"):
        read_gpu_index(path)
