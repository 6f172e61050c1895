"""Sparse FFN kernels: references against hand-computed numbers, Pallas (interpreted) and the C++ twin (jax.ffi)
against the references on random inputs, all against the dense FFN with the inactive neurons zeroed, active-set
checks, GPU lowering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import (
    active_neuron_mask,
    check_active,
    export_for_gpu,
    masked_dense_ffn,
    sparse_down,
    sparse_ffn,
    sparse_gate_up,
    tolerance,
)
from kernels_pallas.common import TRITON_CALL, power_of_two_divisor

ACTIVATIONS = ["swiglu", "reglu", "drelu", "relu", "relu2"]
IMPLEMENTATIONS = ("xla", "pallas", "ffi")
GATED = {"swiglu", "reglu", "drelu"}


def ffn_case(seed: int, n_tokens: int, d_model: int, d_ff: int, capacity: int, count: int, dtype=jnp.float32):
    """Random x and [F, D] weights (never zeros), and an active set of `count` distinct neurons padded with
    arbitrary in-range values to `capacity` (padding must be ignored whatever it holds)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n_tokens, d_model)), dtype)
    scale = d_model**-0.5
    w_gate, w_up, w_down = (jnp.asarray(rng.standard_normal((d_ff, d_model)) * scale, dtype) for _ in range(3))
    active = rng.choice(d_ff, count, replace=False)
    padding = rng.integers(0, d_ff, capacity - count)
    return x, jnp.asarray(np.concatenate([active, padding]), jnp.int32), w_gate, w_up, w_down


def test_gate_up_and_down_references_by_hand():
    x = jnp.array([[1.0, 2.0]])
    w_gate = jnp.array([[1.0, 0.0], [0.0, -1.0], [1.0, 1.0]])  # gate pre-activations 1, -2, 3
    w_up = jnp.array([[2.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])  # up pre-activations 4, 3, -1
    w_down = jnp.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    indices = jnp.array([2, 0, 1], jnp.int32)  # neurons 2 and 0 active, the last entry is padding
    hidden = sparse_gate_up(x, indices, 2, w_gate, w_up, "reglu", implementation="xla")
    np.testing.assert_allclose(hidden, [[3.0 * -1.0, 1.0 * 4.0, 0.0]])  # relu(gate) * up
    hidden = sparse_gate_up(x, indices, 2, w_gate, w_up, "drelu", implementation="xla")
    np.testing.assert_allclose(hidden, [[0.0, 4.0, 0.0]])  # relu(gate) * relu(up)
    y = sparse_down(jnp.array([[-3.0, 4.0, 100.0]]), indices, 2, w_down, implementation="xla")
    np.testing.assert_allclose(y, [[-3.0 * 3 + 4.0 * 1, -3.0 * 30 + 4.0 * 10]])  # padding's 100 is ignored


SHAPES = [  # n_tokens, d_model, d_ff, capacity, count
    (1, 64, 256, 16, 16),  # K = capacity
    (3, 48, 100, 20, 7),  # ragged: capacity not a power of two, D = 3 x 16
    (2, 64, 96, 40, 0),  # K = 0
    (5, 32, 64, 33, 21),  # odd capacity, batch not a power of two
]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_equal_reference_and_masked_dense(activation, shape):
    n_tokens, d_model, d_ff, capacity, count = shape
    x, indices, w_gate, w_up, w_down = ffn_case(sum(shape), *shape)
    w_gate = w_gate if activation in GATED else None
    outputs = {impl: sparse_ffn(x, indices, count, w_gate, w_up, w_down, activation, implementation=impl)
               for impl in IMPLEMENTATIONS}
    hidden = {impl: sparse_gate_up(x, indices, count, w_gate, w_up, activation, implementation=impl)
              for impl in IMPLEMENTATIONS}
    for impl in ("pallas", "ffi"):
        np.testing.assert_allclose(hidden[impl], hidden["xla"], **tolerance(jnp.float32))
        np.testing.assert_allclose(outputs[impl], outputs["xla"], **tolerance(jnp.float32))
        assert np.all(np.asarray(hidden[impl])[:, count:] == 0)  # padding gives exact zeros
    dense = masked_dense_ffn(x, active_neuron_mask(indices, count, d_ff, n_tokens=n_tokens), w_gate, w_up, w_down,
                             activation)
    np.testing.assert_allclose(outputs["xla"], dense, **tolerance(jnp.float32))
    if count == 0:
        assert all(np.all(np.asarray(out) == 0) for out in outputs.values())
    else:
        assert float(jnp.abs(dense).max()) > 0.05  # a non-trivial output


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_within_the_tolerance_table(dtype):
    x, indices, w_gate, w_up, w_down = ffn_case(7, 2, 64, 128, 32, 25, dtype=dtype)
    exact = sparse_ffn(*(a.astype(jnp.float32) for a in (x,)), indices, 25,
                       *(w.astype(jnp.float32) for w in (w_gate, w_up, w_down)), "swiglu", implementation="xla")
    pallas = sparse_ffn(x, indices, 25, w_gate, w_up, w_down, "swiglu", implementation="pallas")
    np.testing.assert_allclose(pallas, exact, **tolerance(dtype))


def test_batched_tokens_with_per_token_masks():
    x, indices, w_gate, w_up, w_down = ffn_case(3, 4, 64, 128, 32, 30)
    token_mask = jnp.asarray(np.random.default_rng(4).random((4, 32)) < 0.5)  # each token keeps its own subset
    expected = masked_dense_ffn(x, active_neuron_mask(indices, 30, 128, token_mask, n_tokens=4), w_gate, w_up,
                                w_down, "drelu")
    for impl in IMPLEMENTATIONS:
        got = sparse_ffn(x, indices, 30, w_gate, w_up, w_down, "drelu", token_mask=token_mask, implementation=impl)
        np.testing.assert_allclose(got, expected, **tolerance(jnp.float32))
    union = sparse_ffn(x, indices, 30, w_gate, w_up, w_down, "drelu", implementation="xla")
    assert float(jnp.abs(union - expected).max()) > 1e-3  # the masks changed the result


def test_one_token_vector_input_and_jit():
    x, indices, w_gate, w_up, w_down = ffn_case(5, 1, 32, 64, 16, 9)
    batched = sparse_ffn(x, indices, 9, w_gate, w_up, w_down, "reglu", implementation="pallas")
    single = jax.jit(lambda v, n: sparse_ffn(v, indices, n, w_gate, w_up, w_down, "reglu", implementation="pallas"))(
        x[0], jnp.int32(9))
    assert single.shape == (32,)
    np.testing.assert_allclose(single, batched[0], **tolerance(jnp.float32))


def test_bad_active_sets_are_rejected_outside_jit():
    _, _, w_gate, w_up, w_down = ffn_case(0, 1, 16, 32, 8, 4)
    x = jnp.ones((1, 16))
    with pytest.raises(ValueError, match=r"out of range \[0, 32\): \[32\]"):
        sparse_ffn(x, jnp.array([1, 32, 3, 0], jnp.int32), 2, w_gate, w_up, w_down, "swiglu")
    with pytest.raises(ValueError, match=r"duplicate active indices: \[5\]"):
        sparse_ffn(x, jnp.array([5, 2, 5, 0], jnp.int32), 3, w_gate, w_up, w_down, "swiglu")
    with pytest.raises(ValueError, match=r"active count 5 outside \[0, capacity 4\]"):
        sparse_ffn(x, jnp.array([0, 1, 2, 3], jnp.int32), 5, w_gate, w_up, w_down, "swiglu")
    with pytest.raises(ValueError, match="-1"):
        check_active(jnp.array([-1, 2], jnp.int32), 1, 32)
    with pytest.raises(ValueError, match="1-D integer array"):
        check_active(jnp.array([0.0, 1.0]), 1, 32)
    # padding beyond the count may hold anything, duplicates included
    check_active(jnp.array([1, 2, 2, 2], jnp.int32), 2, 32)
    with pytest.raises(ValueError, match="activation relu takes no w_gate"):
        sparse_gate_up(x, jnp.array([0], jnp.int32), 1, w_gate, w_up, "relu")
    with pytest.raises(ValueError, match="activation drelu needs w_gate"):
        sparse_gate_up(x, jnp.array([0], jnp.int32), 1, None, w_up, "drelu")
    with pytest.raises(ValueError, match="w_up must be"):
        sparse_gate_up(x, jnp.array([0], jnp.int32), 1, None, w_up.T, "relu")


def test_cpu_twin_checks_indices_inside_jit_and_takes_float32():
    x, indices, w_gate, w_up, w_down = ffn_case(2, 1, 32, 64, 8, 6)
    ffn = jax.jit(lambda indices: sparse_ffn(x, indices, 6, w_gate, w_up, w_down, "drelu", implementation="ffi"))
    np.testing.assert_allclose(ffn(indices), sparse_ffn(x, indices, 6, w_gate, w_up, w_down, "drelu",
                                                        implementation="xla"), **tolerance(jnp.float32))
    with pytest.raises(Exception, match=r"active index 64 out of range \[0, 64\)"):  # traced: checked in C++
        ffn(indices.at[3].set(64)).block_until_ready()
    with pytest.raises(ValueError, match="takes float32; x is bfloat16"):
        sparse_ffn(x.astype(jnp.bfloat16), indices, 6, w_gate, w_up, w_down, "drelu", implementation="ffi")


def test_auto_picks_the_cpu_twin_on_cpu():
    from kernels_pallas.common import Implementation, resolve

    assert resolve("auto") == (Implementation.ffi, True)
    assert resolve("pallas") == (Implementation.pallas, True)  # interpreted on CPU
    assert resolve("pallas", interpret=False) == (Implementation.pallas, False)  # lowering for a GPU


def test_tiles_are_powers_of_two_dividing_the_dimension():
    assert power_of_two_divisor(576, 128) == 64
    assert power_of_two_divisor(4096, 128) == 128
    assert power_of_two_divisor(100, 128) == 4
    assert power_of_two_divisor(11008, 128) == 128


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_pallas_kernels_lower_for_cuda(activation):
    x, indices, w_gate, w_up, w_down = ffn_case(1, 1, 576, 1536, 160, 150)
    w_gate = w_gate if activation in GATED else None

    def ffn(x, indices, count, w_up, w_down):
        return sparse_ffn(x, indices, count, w_gate, w_up, w_down, activation, implementation="pallas",
                          interpret=False)

    exported = export_for_gpu(ffn, x, indices, jnp.int32(150), w_up, w_down)
    assert exported.platforms == ("cuda",)
    text = exported.mlir_module()
    assert text.count(TRITON_CALL) == 2  # gate/up and down kernels
    assert exported.out_avals[0].shape == (1, 576)


@pytest.mark.parametrize("activation, capacity", [("drelu", 64), ("relu", 64), ("swiglu", 12)])
def test_cpu_predictor_fused_gate_up_equals_its_parts(activation, capacity):
    from kernels_pallas.cpu import predict_gate_up_cpu
    from sparse_lm.models.config import Activation
    from sparse_lm.sparse import active_set

    x, _, w_gate, w_up, _ = ffn_case(9, 1, 64, 96, capacity, 0)
    w_gate = w_gate if activation in GATED else None
    rng = np.random.default_rng(10)
    w1, b1 = jnp.asarray(rng.standard_normal((64, 16)) / 8, jnp.float32), jnp.asarray(rng.standard_normal(16) / 4,
                                                                                     jnp.float32)
    w2, b2 = jnp.asarray(rng.standard_normal((16, 96)) / 4, jnp.float32), jnp.asarray(rng.standard_normal(96) / 4,
                                                                                     jnp.float32)
    logits = jax.nn.relu(x @ w1 + b1) @ w2 + b2
    indices, count = active_set(logits[0], 0.1, capacity)
    assert 12 < int(jnp.sum(logits > 0.1)) < 64  # capacity 12 truncates, 64 does not
    hidden, got_indices, got_count = predict_gate_up_cpu(x, w1, b1, w2, b2, True, 0.1, capacity, w_gate, w_up,
                                                         Activation(activation))
    assert int(got_count[0]) == int(count)
    np.testing.assert_array_equal(got_indices, indices)
    expected = sparse_gate_up(x, indices, count, w_gate, w_up, activation, implementation="xla")
    np.testing.assert_allclose(hidden, expected, **tolerance(jnp.float32))


def _activated_gate(activation: str, gate: np.ndarray) -> np.ndarray:
    """sigma(gate) in numpy: an oracle independent of models.ffn."""
    return gate / (1 + np.exp(-gate)) if activation == "swiglu" else np.maximum(gate, 0)


def _gate_threshold_case(activation: str, shape, share: float = 0.5):
    """ffn_case plus a gate threshold halfway between two neighbouring |sigma(gate)| of the active (token, neuron)
    cells where sigma(gate) != 0, zeroing about `share` of those (no cell within rounding of it), and the mask of
    the cells it keeps."""
    n_tokens, d_model, d_ff, capacity, count = shape
    x, indices, w_gate, w_up, w_down = ffn_case(sum(shape) + 1, *shape)
    gate = np.asarray(x, np.float64) @ np.asarray(w_gate, np.float64).T  # [B, F]
    magnitude = np.abs(_activated_gate(activation, gate))
    active = magnitude[:, np.asarray(indices[:count])].reshape(-1)
    active = np.sort(active[active > 0])
    i = int(share * (active.size - 1))
    threshold = float((active[i] + active[i + 1]) / 2)
    return x, indices, w_gate, w_up, w_down, threshold, magnitude > threshold


def test_gate_threshold_by_hand():
    x = jnp.array([[1.0, 2.0]])
    w_gate = jnp.array([[1.0, 0.0], [0.0, -1.0], [1.0, 1.0]])  # gate pre-activations 1, -2, 3
    w_up = jnp.array([[2.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])  # up pre-activations 4, 3, -1
    indices = jnp.array([2, 0, 1], jnp.int32)
    # FATReLU at t = 2: neuron 2 (relu(3) = 3 > 2) is kept, neuron 0 (relu(1) = 1) zeroed
    hidden = sparse_gate_up(x, indices, 2, w_gate, w_up, "reglu", gate_threshold=2.0, implementation="xla")
    np.testing.assert_allclose(hidden, [[3.0 * -1.0, 0.0, 0.0]])
    # SwiGLU at t = 0.5: |silu(3)| = 2.86 and |silu(1)| = 0.73 pass, |silu(-2)| = 0.24 does not
    hidden = sparse_gate_up(x, indices, 3, w_gate, w_up, "swiglu", gate_threshold=0.5, implementation="xla")
    silu = np.array([3.0, 1.0]) / (1 + np.exp(-np.array([3.0, 1.0])))
    np.testing.assert_allclose(hidden, [[silu[0] * -1.0, silu[1] * 4.0, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("activation", sorted(GATED))
@pytest.mark.parametrize("shape", SHAPES[:2] + SHAPES[3:], ids=lambda s: "x".join(map(str, s)))
def test_gate_threshold_every_implementation_equals_the_oracle(activation, shape):
    """Every implementation with a gate threshold zeroing about half the active cells equals the dense FFN whose
    mask also drops the cells with |sigma(gate)| <= t (computed in numpy), and differs from the unthresholded FFN."""
    n_tokens, d_model, d_ff, capacity, count = shape
    x, indices, w_gate, w_up, w_down, threshold, passes = _gate_threshold_case(activation, shape)
    active = np.asarray(active_neuron_mask(indices, count, d_ff, n_tokens=n_tokens))
    # a good share of the active cells that the plain pair keeps is zeroed, and a good share kept
    assert 0.3 < passes[active & (np.asarray(x @ w_gate.T) > 0)].mean() < 0.7
    expected = masked_dense_ffn(x, jnp.asarray(active & passes), w_gate, w_up, w_down, activation)
    unthresholded = masked_dense_ffn(x, jnp.asarray(active), w_gate, w_up, w_down, activation)
    assert float(jnp.abs(expected - unthresholded).max()) > 1e-2
    np.testing.assert_allclose(masked_dense_ffn(x, jnp.asarray(active), w_gate, w_up, w_down, activation,
                                                gate_threshold=threshold), expected, **tolerance(jnp.float32))
    kept = passes[:, np.asarray(indices)] & (np.arange(capacity) < count)  # [B, K]
    plain = np.asarray(sparse_gate_up(x, indices, count, w_gate, w_up, activation, implementation="xla"))
    for impl in IMPLEMENTATIONS:
        hidden = np.asarray(sparse_gate_up(x, indices, count, w_gate, w_up, activation, gate_threshold=threshold,
                                           implementation=impl))
        assert np.all(hidden[~kept] == 0), impl  # exact zeros where the gate fails
        np.testing.assert_allclose(hidden[kept], plain[kept], **tolerance(jnp.float32), err_msg=impl)
        y = sparse_ffn(x, indices, count, w_gate, w_up, w_down, activation, gate_threshold=threshold,
                       implementation=impl)
        np.testing.assert_allclose(y, expected, **tolerance(jnp.float32), err_msg=impl)


@pytest.mark.parametrize("activation", sorted(GATED))
def test_no_gate_threshold_is_bit_for_bit_the_plain_pair(activation):
    """None and -inf both mean no gate threshold: the same bits as a call without one, in every implementation."""
    x, indices, w_gate, w_up, w_down = ffn_case(11, 3, 48, 100, 20, 17)
    for impl in IMPLEMENTATIONS:
        plain = sparse_ffn(x, indices, 17, w_gate, w_up, w_down, activation, implementation=impl)
        for none in (None, -np.inf, float("-inf")):
            np.testing.assert_array_equal(sparse_ffn(x, indices, 17, w_gate, w_up, w_down, activation,
                                                     gate_threshold=none, implementation=impl), plain)


def test_a_gate_threshold_on_an_ungated_ffn_is_refused():
    x, indices, _, w_up, _ = ffn_case(0, 1, 16, 32, 8, 4)
    with pytest.raises(ValueError, match="gate threshold needs a gated activation, not relu"):
        sparse_gate_up(x, indices, 4, None, w_up, "relu", gate_threshold=0.1)
    sparse_gate_up(x, indices, 4, None, w_up, "relu", gate_threshold=-np.inf)  # no threshold: fine


def test_pallas_kernel_with_a_gate_threshold_lowers_for_cuda():
    x, indices, w_gate, w_up, w_down = ffn_case(1, 1, 576, 1536, 160, 150)

    def ffn(x, indices, count, w_up, w_down):
        return sparse_ffn(x, indices, count, w_gate, w_up, w_down, "reglu", gate_threshold=0.3,
                          implementation="pallas", interpret=False)

    exported = export_for_gpu(ffn, x, indices, jnp.int32(150), w_up, w_down)
    assert exported.mlir_module().count(TRITON_CALL) == 2


@pytest.mark.parametrize("activation", sorted(GATED))
def test_cpu_predictor_fused_gate_up_applies_the_gate_threshold(activation):
    from kernels_pallas.cpu import predict_gate_up_cpu
    from sparse_lm.models.config import Activation
    from sparse_lm.sparse import active_set

    x, _, w_gate, w_up, _, threshold, passes = _gate_threshold_case(activation, (1, 64, 96, 64, 64))
    rng = np.random.default_rng(12)
    w1, b1 = jnp.asarray(rng.standard_normal((64, 16)) / 8, jnp.float32), jnp.asarray(rng.standard_normal(16) / 4,
                                                                                     jnp.float32)
    w2, b2 = jnp.asarray(rng.standard_normal((16, 96)) / 4, jnp.float32), jnp.asarray(rng.standard_normal(96) / 4,
                                                                                     jnp.float32)
    indices, count = active_set((jax.nn.relu(x @ w1 + b1) @ w2 + b2)[0], 0.1, 64)
    hidden, got_indices, got_count = predict_gate_up_cpu(x, w1, b1, w2, b2, True, 0.1, 64, w_gate, w_up,
                                                         Activation(activation), gate_threshold=threshold)
    np.testing.assert_array_equal(got_indices, indices)
    expected = sparse_gate_up(x, indices, count, w_gate, w_up, activation, gate_threshold=threshold,
                              implementation="xla")
    np.testing.assert_allclose(hidden, expected, **tolerance(jnp.float32))
    kept = passes[0, np.asarray(indices)] & (np.arange(64) < int(count))
    plain = np.asarray(sparse_gate_up(x, indices, count, w_gate, w_up, activation, implementation="xla"))[0]
    assert np.abs(plain[~kept]).max() > 0.05 and np.abs(plain[kept]).max() > 0.05  # it zeroed some, kept some
    assert np.all(np.asarray(hidden)[0, ~kept] == 0)
