"""The sparse decode engine: active sets by hand, equality with the predictor-gated dense model, the capacity cap
applied alike in decode and in the full-sequence forward, and one compilation for the whole decode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm.eval.generate import Generator
from sparse_lm.models.presets import TINY
from sparse_lm.models.transformer import Transformer, init_cache
from sparse_lm.predictors import PredictorSet, attach
from sparse_lm.sparse import (
    SparseEngineConfig,
    active_mask,
    active_set,
    choose_capacities,
    install,
    predicted_counts,
    remove,
)


def test_active_set_by_hand():
    logits = jnp.array([0.5, 3.0, -1.0, 2.0, 1.0])
    indices, count = active_set(logits, 0.7, capacity=2)  # neurons 1, 3, 4 predicted; the first two kept
    assert indices.tolist() == [1, 3] and int(count) == 2
    indices, count = active_set(logits, 0.7, capacity=4)
    assert indices.tolist() == [1, 3, 4, 0] and int(count) == 3  # ascending, padded with 0
    assert active_mask(logits, 0.7, capacity=2).tolist() == [False, True, False, True, False]
    assert active_mask(logits[None, None], 0.7, capacity=4)[0, 0].tolist() == [False, True, False, True, True]
    assert active_mask(jnp.array([[2.0, 2.0, 0.0, 2.0]]), 1.0, capacity=2).tolist() == [[True, True, False, False]]
    indices, count = active_set(logits, 5.0, capacity=3)
    assert int(count) == 0


def test_choose_capacities():
    counts = np.array([[10, 20, 30, 40], [1, 1, 1, 100]])
    assert choose_capacities(counts, d_ff=64, quantile=1.0, multiple=16) == [48, 64]  # 40 -> 48; 100 capped at 64
    assert choose_capacities(counts, d_ff=64, quantile=0.5, multiple=8) == [32, 8]
    with pytest.raises(ValueError, match="capacity_quantile"):
        SparseEngineConfig(capacity_quantile=0.0)


def _model_and_predictors(activation="drelu"):
    model = Transformer(TINY.replace(activation=activation), rngs=nnx.Rngs(0))
    predictors = PredictorSet(model.config, [8, 8], rngs=nnx.Rngs(1))
    predictors.thresholds[...] = jnp.array([0.0, 0.1])  # about half the neurons predicted
    return model, predictors


def _decode_logits(model, tokens):
    """Logits of each position, fed one token at a time through the KV cache (the decode path)."""
    cache = init_cache(model.config, 1, 32)
    out = []
    for position in range(tokens.shape[1]):
        logits, cache = model(tokens[:, position : position + 1], cache)
        out.append(logits[:, 0])
    return jnp.stack(out, axis=1)


@pytest.mark.parametrize("implementation", ["ffi", "xla", "pallas"])
def test_engine_equals_the_gated_dense_model(implementation):
    model, predictors = _model_and_predictors()
    tokens = jax.random.randint(jax.random.key(2), (1, 6), 0, TINY.vocab_size)
    attach(model, predictors)
    gated_full = model(tokens)[0]
    gated_decode = _decode_logits(model, tokens)
    attach(model, None)
    dense = model(tokens)[0]
    install(model, predictors, [TINY.d_ff] * 2, implementation)  # no cap: exactly the predicted neurons
    engine_decode = _decode_logits(model, tokens)
    engine_full = model(tokens)[0]
    remove(model)
    np.testing.assert_allclose(engine_decode, gated_decode, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(engine_full, gated_full, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(gated_decode, gated_full, rtol=2e-4, atol=2e-4)
    assert float(jnp.abs(engine_full - dense).max()) > 1e-3  # the predictor changed something
    np.testing.assert_allclose(model(tokens)[0], dense)  # removed: the dense model again


def test_capacity_cap_is_the_same_in_decode_and_full_forward():
    model, predictors = _model_and_predictors()
    tokens = jax.random.randint(jax.random.key(3), (1, 5), 0, TINY.vocab_size)
    counts = predicted_counts(model, predictors, np.asarray(tokens).repeat(4, axis=0), batch_size=4)
    assert counts.shape == (2, 20) and counts.max() > 8  # some tokens predict more than the cap below
    install(model, predictors, [8, 8], "ffi")
    capped_decode = _decode_logits(model, tokens)
    capped_full = model(tokens)[0]
    install(model, predictors, [TINY.d_ff] * 2, "ffi")
    uncapped = model(tokens)[0]
    remove(model)
    np.testing.assert_allclose(capped_decode, capped_full, rtol=2e-4, atol=2e-4)
    assert float(jnp.abs(capped_full - uncapped).max()) > 1e-3


def test_decode_compiles_once():
    model, predictors = _model_and_predictors("reglu")
    install(model, predictors, [32, 32], "ffi")
    generator = Generator(model, capacity=64)
    result = generator.generate([1, 2, 3], max_new_tokens=12)
    assert len(result.tokens) == 12
    assert generator._decode._cache_size() == 1  # the active count changes every token; shapes never do
    generator.generate([4, 5, 6, 7, 8], max_new_tokens=6)
    assert generator._decode._cache_size() == 1


def _model_and_int4_predictors(activation="drelu"):
    from sparse_lm.predictors.quantized import Int4PredictorSet

    model = Transformer(TINY.replace(activation=activation), rngs=nnx.Rngs(0))
    predictors = Int4PredictorSet(model)
    predictors.thresholds[...] = jnp.array([0.0, -0.02])
    return model, predictors


@pytest.mark.parametrize("activation", ["drelu", "reglu"])
@pytest.mark.parametrize("implementation", ["ffi", "xla"])
def test_int4_engine_equals_the_int4_gated_dense_model(activation, implementation):
    model, predictors = _model_and_int4_predictors(activation)
    tokens = jax.random.randint(jax.random.key(4), (1, 6), 0, TINY.vocab_size)
    attach(model, predictors)
    gated_full = model(tokens)[0]
    attach(model, None)
    dense = model(tokens)[0]
    install(model, predictors, [TINY.d_ff] * 2, implementation)
    engine_decode = _decode_logits(model, tokens)
    engine_full = model(tokens)[0]
    remove(model)
    np.testing.assert_allclose(engine_decode, gated_full, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(engine_full, gated_full, rtol=2e-4, atol=2e-4)
    # on random weights about a quarter of dReLU's neurons fire: the prediction misses some, so logits move a little
    assert 1e-4 < float(jnp.abs(engine_full - dense).max()) < 0.5


def test_int4_decode_compiles_once():
    model, predictors = _model_and_int4_predictors()
    install(model, predictors, [48, 48], "ffi")
    generator = Generator(model, capacity=64)
    generator.generate([1, 2, 3], max_new_tokens=10)
    generator.generate([4, 5, 6, 7, 8], max_new_tokens=6)
    assert generator._decode._cache_size() == 1
    remove(model)


GATE_THRESHOLDS = (0.6, 0.8)  # FATReLU: with gate pre-activations ~ N(0, 1) these zero about half of g > 0


def _fatrelu_model_and_predictors(thresholds=GATE_THRESHOLDS, int4=False):
    config = TINY.replace(activation="reglu", ffn_thresholds=thresholds, ffn_threshold_on="gate")
    model = Transformer(config, rngs=nnx.Rngs(0))
    if int4:
        from sparse_lm.predictors.quantized import Int4PredictorSet

        predictors = Int4PredictorSet(model)
        predictors.thresholds[...] = jnp.array([0.0, -0.02])
    else:
        predictors = PredictorSet(model.config, [8, 8], rngs=nnx.Rngs(1))
        predictors.thresholds[...] = jnp.array([0.0, 0.1])
    return model, predictors


def _gated_dense(model, predictors, tokens):
    attach(model, predictors)
    logits = model(tokens)[0]
    attach(model, None)
    return logits


@pytest.mark.parametrize(("implementation", "int4"), [("ffi", False), ("xla", False), ("pallas", False),
                                                      ("ffi", True), ("xla", True)])  # int4: no Pallas path
def test_engine_applies_the_gate_thresholds_of_a_fatrelu_model(implementation, int4):
    """ReGLU with per-layer thresholds on the activated gate: decode (every kernel, low-rank and int4 predictors)
    and the full-sequence forward equal the dense model gated by the same predictors and thresholded the same way."""
    model, predictors = _fatrelu_model_and_predictors(int4=int4)
    plain_model, _ = _fatrelu_model_and_predictors(thresholds=None, int4=int4)  # same weights, no threshold
    tokens = jax.random.randint(jax.random.key(5), (1, 6), 0, TINY.vocab_size)
    gated = _gated_dense(model, predictors, tokens)
    assert float(jnp.abs(gated - _gated_dense(plain_model, predictors, tokens)).max()) > 1e-2  # thresholds matter
    install(model, predictors, [TINY.d_ff] * 2, implementation)
    engine_decode = _decode_logits(model, tokens)
    engine_full = model(tokens)[0]
    remove(model)
    np.testing.assert_allclose(engine_decode, gated, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(engine_full, gated, rtol=2e-4, atol=2e-4)


def test_only_gate_thresholds_reach_the_kernels():
    """A model with no threshold, or one thresholded on the hidden activation, hands the kernels no gate threshold
    (None: the plain activation pair, bit for bit, see tests/kernels); a FATReLU model its per-layer thresholds."""
    from sparse_lm.sparse import gate_threshold_of

    model, predictors = _model_and_predictors("reglu")
    assert all(gate_threshold_of(block.ffn) is None for block in model.blocks)
    hidden_thresholded = Transformer(TINY.replace(activation="reglu", ffn_thresholds=(0.1,)), rngs=nnx.Rngs(0))
    assert all(gate_threshold_of(block.ffn) is None for block in hidden_thresholded.blocks)
    fatrelu, _ = _fatrelu_model_and_predictors()
    assert [gate_threshold_of(block.ffn) for block in fatrelu.blocks] == list(GATE_THRESHOLDS)
