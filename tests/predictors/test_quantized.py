"""Int4 predictors: built from the model's own rows, thresholds calibrated to a recall, and the row reads that
make the sparse engine's floor."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from sparse_lm.models.presets import TINY
from sparse_lm.models.transformer import Transformer
from sparse_lm.predictors.quantized import Int4PredictorSet, calibrate, row_reads


def _tokens(n, seed=0):
    return np.asarray(jax.random.randint(jax.random.key(seed), (n, 32), 0, TINY.vocab_size))


def test_calibration_reaches_the_target_recall_and_orders_thresholds():
    model = Transformer(TINY.replace(activation="drelu"), rngs=nnx.Rngs(0))
    predictors = Int4PredictorSet(model)
    tokens = _tokens(8)
    loose = calibrate(model, predictors, tokens, 0.9)
    strict = calibrate(model, predictors, tokens, 0.999)
    assert np.all(strict < loose)
    reads = row_reads(model, predictors, tokens, [TINY.d_ff] * 2)
    assert np.all(reads["recall"] >= 0.999)
    # predicted >= gate passed >= fired among predicted; a ReLU-family layer fires on a fraction of its neurons
    assert np.all(reads["predicted"] >= reads["gate_passed"])
    assert np.all(reads["gate_passed"] >= reads["fired_predicted"])
    assert np.all(reads["fired"] < 0.6 * TINY.d_ff) and np.all(reads["fired"] > 0.05 * TINY.d_ff)
    # 4-bit rows: recall 0.999 costs few extra neurons on top of those that fire
    assert np.all(reads["predicted"] < 1.6 * reads["fired"])
    capped = row_reads(model, predictors, tokens, [16, 16])
    assert np.all(capped["predicted"] <= 16) and np.all(capped["recall"] < reads["recall"])


def test_int4_predictors_need_exact_zeros():
    model = Transformer(TINY, rngs=nnx.Rngs(0))  # swiglu
    with pytest.raises(ValueError, match="swiglu has none"):
        Int4PredictorSet(model)


def test_calibration_rejects_a_bad_recall():
    model = Transformer(TINY.replace(activation="relu"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="target recall must be in"):
        calibrate(model, Int4PredictorSet(model), _tokens(4), 1.5)


def test_check_fits_names_both_shapes():
    model = Transformer(TINY.replace(activation="drelu"), rngs=nnx.Rngs(0))
    other = Transformer(TINY.replace(activation="drelu", n_layers=3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cover 2 layers of 64 -> 128 but model tiny has 3"):
        Int4PredictorSet(model).check_fits(other.config)


def test_fatrelu_calibration_and_row_reads_use_the_gate_threshold():
    """ReGLU thresholded on its activated gate fires where g > t: calibration recalls those cells (its thresholds
    rise over the plain model's, which fires wherever g > 0) and the up rows read are the predicted neurons with
    g > t, which for ReGLU are exactly the predicted ones that fire."""
    fatrelu = Transformer(TINY.replace(activation="reglu", ffn_thresholds=(0.6, 0.8), ffn_threshold_on="gate"),
                          rngs=nnx.Rngs(0))
    plain = Transformer(TINY.replace(activation="reglu"), rngs=nnx.Rngs(0))  # the same weights
    tokens = _tokens(8)
    predictors, plain_predictors = Int4PredictorSet(fatrelu), Int4PredictorSet(plain)
    thresholds = calibrate(fatrelu, predictors, tokens, 0.99)
    assert np.all(thresholds > calibrate(plain, plain_predictors, tokens, 0.99) + 0.05)
    reads = row_reads(fatrelu, predictors, tokens, [TINY.d_ff] * 2)
    assert np.all(reads["recall"] >= 0.99)
    np.testing.assert_allclose(reads["gate_passed"], reads["fired_predicted"])
    assert np.all(reads["fired"] < 0.6 * row_reads(plain, plain_predictors, tokens, [TINY.d_ff] * 2)["fired"])
