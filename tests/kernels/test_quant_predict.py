"""The int4 predictor kernels: quantisation by hand, scores against a direct computation, the C++ twin against
the reference (scores, and the fused sparse FFN with its cap), and how well the 4-bit rows predict firing."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import cpu
from kernels_pallas.quant_predict import (
    capped_mask,
    decisive_projections,
    dequantize_rows,
    int4_scores,
    int4_scores_reference,
    quant_sparse_ffn,
    quant_sparse_ffn_reference,
    quantize_rows,
    quantize_x,
)
from kernels_pallas.sparse_ffn import masked_dense_ffn
from sparse_lm.models.config import Activation

needs_cpu_twin = pytest.mark.skipif(not cpu.available(), reason="the C++ twin is not built")


def _weights(d_ff, d_model, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(d_ff, d_model)) / np.sqrt(d_model)).astype(np.float32) for _ in range(3)]


def _rows_for(activation, w_gate, w_up):
    uses_gate, uses_up = decisive_projections(activation)
    return (quantize_rows(w_gate) if uses_gate else None), (quantize_rows(w_up) if uses_up else None)


def test_quantize_rows_by_hand():
    row = np.zeros((1, 32), np.float32)
    row[0, 0], row[0, 1], row[0, 16], row[0, 31] = 7.0, -3.0, 1.4, -7.0  # absmax 7: scale 1
    q = quantize_rows(row)
    assert float(q.scales[0, 0]) == 1.0
    packed = np.asarray(q.packed)[0]
    assert packed.shape == (16,)
    assert packed[0] == (7 + 8) | ((1 + 8) << 4)  # element 0 low nibble, element 16 (1.4 -> 1) high nibble
    assert packed[1] == (-3 + 8) | (8 << 4)
    assert packed[15] == 8 | ((-7 + 8) << 4)
    np.testing.assert_allclose(np.asarray(dequantize_rows(q))[0, [0, 1, 16, 31]], [7, -3, 1, -7])
    assert float(q.inv_norms[0]) == pytest.approx(1 / np.sqrt(49 + 9 + 1 + 49))
    zero = quantize_rows(np.zeros((2, 64), np.float32))
    assert float(jnp.abs(dequantize_rows(zero)).max()) == 0.0 and float(zero.inv_norms.max()) == 0.0


def test_quantisation_errors_are_within_half_a_step():
    w, _, _ = _weights(16, 96)
    q = quantize_rows(w)
    step = np.repeat(np.asarray(q.scales), 32, axis=1)
    assert np.all(np.abs(np.asarray(dequantize_rows(q)) - w) <= step / 2 + 1e-7)
    x = np.random.default_rng(1).normal(size=(3, 96)).astype(np.float32)
    x_step = np.repeat(np.abs(x.reshape(3, 3, 32)).max(-1) / 127, 32, axis=1)
    assert np.all(np.abs(np.asarray(quantize_x(jnp.asarray(x))) - x) <= x_step / 2 + 1e-7)


def test_scores_are_normalised_quantised_dots_min_over_projections():
    w_gate, w_up, _ = _weights(8, 64, seed=2)
    x = np.random.default_rng(3).normal(size=(2, 64)).astype(np.float32)
    gate, up = quantize_rows(w_gate), quantize_rows(w_up)
    xq = np.asarray(quantize_x(jnp.asarray(x)), np.float64)
    direct = []
    for rows in (gate, up):
        deq = np.asarray(dequantize_rows(rows), np.float64)
        direct.append(xq @ deq.T / np.linalg.norm(deq, axis=1) / np.linalg.norm(xq, axis=1, keepdims=True))
    np.testing.assert_allclose(int4_scores_reference(jnp.asarray(x), gate, None), direct[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(int4_scores_reference(jnp.asarray(x), gate, up), np.minimum(*direct), rtol=1e-5,
                               atol=1e-6)


def test_scores_track_the_true_cosine():
    """The point of the predictor: 4-bit rows keep a neuron's sign wherever it is not close to zero."""
    w_gate, _, _ = _weights(512, 576, seed=4)
    x = np.random.default_rng(5).normal(size=(8, 576)).astype(np.float32)
    true = x @ w_gate.T / np.linalg.norm(w_gate, axis=1) / np.linalg.norm(x, axis=1, keepdims=True)
    scores = np.asarray(int4_scores_reference(jnp.asarray(x), quantize_rows(w_gate), None))
    rms = np.sqrt(np.mean(true**2))
    error = np.sqrt(np.mean((scores - true) ** 2))
    assert 0.01 * rms < error < 0.12 * rms  # 4-bit noise: there, and about a tenth of the spread
    clear = np.abs(true) > 0.3 * rms
    assert np.mean(np.sign(scores[clear]) == np.sign(true[clear])) > 0.995


@pytest.mark.parametrize("activation", ["swiglu"])
def test_activation_without_exact_zeros_is_refused(activation):
    with pytest.raises(ValueError, match="swiglu has none"):
        decisive_projections(activation)


def test_d_model_not_a_multiple_of_32_is_refused():
    with pytest.raises(ValueError, match="d_model divisible by 32, got 40"):
        quantize_rows(np.ones((4, 40), np.float32))


@needs_cpu_twin
@pytest.mark.parametrize("activation", ["drelu", "reglu", "relu", "relu2"])
@pytest.mark.parametrize(("d_ff", "d_model", "tokens"), [(64, 32, 1), (48, 96, 2), (100, 128, 3), (256, 576, 2)])
def test_cpu_scores_equal_the_reference(activation, d_ff, d_model, tokens):
    w_gate, w_up, _ = _weights(d_ff, d_model, seed=d_ff)
    gate, up = _rows_for(activation, w_gate, w_up)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(tokens, d_model)).astype(np.float32))
    np.testing.assert_allclose(int4_scores(x, gate, up, activation, implementation="ffi"),
                               int4_scores_reference(x, gate, up), rtol=1e-5, atol=1e-6)


def _threshold_between_scores(scores: np.ndarray, quantile: float) -> float:
    """A threshold halfway between two neighbouring scores, so float rounding cannot flip any neuron."""
    s = np.sort(scores.reshape(-1))
    i = int(quantile * (s.size - 1))
    return float((s[i] + s[i + 1]) / 2)


@needs_cpu_twin
@pytest.mark.parametrize("activation", ["drelu", "reglu", "relu", "relu2"])
@pytest.mark.parametrize(("quantile", "capacity"), [(0.5, 256), (0.2, 40), (0.0, 256), (0.95, 8)])
def test_cpu_fused_ffn_equals_the_reference(activation, quantile, capacity):
    d_ff, d_model = 256, 128
    w_gate, w_up, w_down = _weights(d_ff, d_model, seed=7)
    gate, up = _rows_for(activation, w_gate, w_up)
    x = jnp.asarray(np.random.default_rng(8).normal(size=(1, d_model)).astype(np.float32))
    threshold = _threshold_between_scores(np.asarray(int4_scores_reference(x, gate, up)), quantile)
    gated = Activation(activation).gated
    args = (x, gate, up, threshold, capacity, jnp.asarray(w_gate) if gated else None, jnp.asarray(w_up),
            jnp.asarray(w_down), activation)
    y, count = quant_sparse_ffn(*args, implementation="ffi")
    y_ref, count_ref = quant_sparse_ffn(*args, implementation="xla")
    assert int(count[0]) == int(count_ref[0]) == min(capacity, round((1 - quantile) * (d_ff - 1)))
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_ref, quant_sparse_ffn_reference(*args), rtol=0, atol=0)
    assert float(jnp.abs(y).max()) > 0.1


@needs_cpu_twin
def test_cpu_fused_ffn_with_nothing_predicted_is_zero():
    w_gate, w_up, w_down = _weights(64, 32)
    gate, up = _rows_for("drelu", w_gate, w_up)
    x = jnp.ones((1, 32), jnp.float32)
    y, count = quant_sparse_ffn(x, gate, up, 2.0, 64, jnp.asarray(w_gate), jnp.asarray(w_up), jnp.asarray(w_down),
                                "drelu", implementation="ffi")  # scores are cosines: none exceeds 2
    assert int(count[0]) == 0 and float(jnp.abs(y).max()) == 0.0


@needs_cpu_twin
def test_every_firing_neuron_predicted_gives_the_dense_ffn():
    """A threshold below every score predicts all neurons: the sparse output is the whole dense FFN."""
    w_gate, w_up, w_down = _weights(128, 64, seed=9)
    gate, up = _rows_for("drelu", w_gate, w_up)
    x = jnp.asarray(np.random.default_rng(10).normal(size=(1, 64)).astype(np.float32))
    y, count = quant_sparse_ffn(x, gate, up, -2.0, 128, jnp.asarray(w_gate), jnp.asarray(w_up), jnp.asarray(w_down),
                                "drelu", implementation="ffi")
    dense = masked_dense_ffn(x, jnp.ones((1, 128), bool), jnp.asarray(w_gate), jnp.asarray(w_up),
                             jnp.asarray(w_down), Activation.drelu)
    assert int(count[0]) == 128
    np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-5)


def test_pallas_is_not_offered_for_the_int4_predictor():
    w_gate, w_up, _ = _weights(64, 32)
    gate, up = _rows_for("drelu", w_gate, w_up)
    with pytest.raises(ValueError, match="quant_predict has no Pallas kernel"):
        int4_scores(jnp.ones((1, 32)), gate, up, "drelu", implementation="pallas")


@needs_cpu_twin
@pytest.mark.parametrize("activation", ["drelu", "reglu"])
@pytest.mark.parametrize(("quantile", "capacity"), [(0.3, 256), (0.2, 40)])
def test_cpu_fused_ffn_with_a_gate_threshold_equals_the_reference(activation, quantile, capacity):
    """FATReLU: of the predicted neurons only those with g > t count. Every implementation equals the dense FFN
    whose mask also drops g <= t (computed in numpy), which differs from the FFN without the gate threshold."""
    d_ff, d_model = 256, 128
    w_gate, w_up, w_down = _weights(d_ff, d_model, seed=11)
    gate, up = _rows_for(activation, w_gate, w_up)
    x = jnp.asarray(np.random.default_rng(12).normal(size=(1, d_model)).astype(np.float32))
    scores = np.asarray(int4_scores_reference(x, gate, up))
    threshold = _threshold_between_scores(scores, quantile)
    g = (np.asarray(x, np.float64) @ w_gate.T.astype(np.float64))[0]
    predicted = np.asarray(capped_mask(jnp.asarray(scores > threshold), capacity))[0]
    positive = np.sort(g[predicted & (g > 0)])
    i = positive.size // 2
    gate_threshold = float((positive[i - 1] + positive[i]) / 2)  # halves the predicted neurons with g > 0
    args = (x, gate, up, threshold, capacity, jnp.asarray(w_gate), jnp.asarray(w_up), jnp.asarray(w_down), activation)
    oracle = masked_dense_ffn(x, jnp.asarray(predicted & (g > gate_threshold))[None], jnp.asarray(w_gate),
                              jnp.asarray(w_up), jnp.asarray(w_down), Activation(activation))
    plain = masked_dense_ffn(x, jnp.asarray(predicted)[None], jnp.asarray(w_gate), jnp.asarray(w_up),
                             jnp.asarray(w_down), Activation(activation))
    assert float(jnp.abs(oracle - plain).max()) > 0.05
    y, count = quant_sparse_ffn(*args, gate_threshold=gate_threshold, implementation="ffi")
    y_ref, count_ref = quant_sparse_ffn(*args, gate_threshold=gate_threshold, implementation="xla")
    assert int(count[0]) == int(count_ref[0]) == predicted.sum()  # the count is the predictor's, before the gate
    np.testing.assert_allclose(y, oracle, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_ref, oracle, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(quant_sparse_ffn_reference(*args, gate_threshold=gate_threshold), y_ref, rtol=0,
                               atol=0)


@needs_cpu_twin
@pytest.mark.parametrize("activation", ["drelu", "reglu", "relu"])
def test_cpu_fused_ffn_without_a_gate_threshold_is_unchanged(activation):
    """None and -inf: no gate threshold, the same bits as a call without one."""
    w_gate, w_up, w_down = _weights(128, 64, seed=13)
    gate, up = _rows_for(activation, w_gate, w_up)
    x = jnp.asarray(np.random.default_rng(14).normal(size=(1, 64)).astype(np.float32))
    gated = Activation(activation).gated
    args = (x, gate, up, -0.05, 100, jnp.asarray(w_gate) if gated else None, jnp.asarray(w_up), jnp.asarray(w_down),
            activation)
    for implementation in ("ffi", "xla"):
        y, count = quant_sparse_ffn(*args, implementation=implementation)
        for none in (None, -np.inf):
            y_none, count_none = quant_sparse_ffn(*args, gate_threshold=none, implementation=implementation)
            np.testing.assert_array_equal(y_none, y)
            np.testing.assert_array_equal(count_none, count)


def test_a_gate_threshold_without_a_gate_is_refused():
    _, w_up, w_down = _weights(64, 32)
    _, up = _rows_for("relu", None, w_up)
    with pytest.raises(ValueError, match="gate threshold needs a gated activation, not relu"):
        quant_sparse_ffn(jnp.ones((1, 32)), None, up, 0.0, 64, None, jnp.asarray(w_up), jnp.asarray(w_down), "relu",
                         gate_threshold=0.1)
