"""Sliding-window perplexity: window plans, exact agreement with a direct computation, real model."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm.data import DataConfig, split_tokens
from sparse_lm.eval.perplexity import perplexity, plan_windows, token_nll
from sparse_lm.models.presets import TINY
from sparse_lm.models.transformer import Transformer
from tests.helpers import needs_smollm2


@pytest.mark.parametrize("n_tokens, context, stride", [(10, 4, 4), (10, 4, 2), (3, 8, 8), (100, 10, 3), (2, 2, 1)])
def test_every_token_after_the_first_is_scored_once(n_tokens, context, stride):
    windows = plan_windows(n_tokens, context, stride)
    scored = [p for w in windows for p in range(w.score_from, w.end)]
    assert scored == list(range(1, n_tokens))
    for w in windows:
        assert w.end - w.begin <= context and w.score_from >= w.begin + 1


def test_window_plan_hand_computed():
    plan = [(w.begin, w.end, w.score_from) for w in plan_windows(10, 4, 4)]
    assert plan == [(0, 4, 1), (3, 7, 4), (6, 10, 7)]
    # the last window is kept full length, so it scores with the most context
    assert [(w.begin, w.end) for w in plan_windows(9, 4, 2)][-1] == (5, 9)


@pytest.mark.parametrize("n_tokens, context, stride", [(1, 4, 4), (10, 1, 1), (10, 4, 0), (10, 4, 5)])
def test_bad_window_arguments(n_tokens, context, stride):
    with pytest.raises(ValueError):
        plan_windows(n_tokens, context, stride)


def test_token_nll_hand_computed():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    np.testing.assert_allclose(token_nll(logits, jnp.array([[0, 2]])), [[np.log(2), -np.log(0.8)]], rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_model():
    return Transformer(TINY, rngs=nnx.Rngs(7))


def direct_nll(model, tokens: np.ndarray) -> float:
    logits, _ = model(jnp.asarray(tokens[None, :-1]))
    return float(jnp.mean(token_nll(logits, jnp.asarray(tokens[None, 1:]))))


def test_one_window_equals_direct_computation(tiny_model):
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (40,), 0, 257))
    result = perplexity(tiny_model, tokens, context=64, progress=False)
    assert result.n_windows == 1 and result.n_scored == 39
    assert result.nll == pytest.approx(direct_nll(tiny_model, tokens), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.nll), rel=1e-12)


def test_windows_equal_per_window_direct_computation(tiny_model):
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (50,), 0, 257))
    context, stride = 16, 8
    expected_sum = 0.0
    for w in plan_windows(len(tokens), context, stride):
        logits, _ = tiny_model(jnp.asarray(tokens[None, w.begin : w.end - 1]))
        nll = np.asarray(token_nll(logits, jnp.asarray(tokens[None, w.begin + 1 : w.end])))[0]
        expected_sum += float(nll[w.score_from - w.begin - 1 :].sum())
    for batch_size in (1, 3):
        result = perplexity(tiny_model, tokens, context=context, stride=stride, batch_size=batch_size, progress=False)
        assert result.n_scored == 49
        assert result.nll == pytest.approx(expected_sum / 49, rel=1e-5)


@needs_smollm2
@pytest.mark.real_model
@pytest.mark.real_corpus
def test_smollm2_perplexity_on_web_validation_prefix(smollm2, tmp_path):
    model, tokenizer = smollm2
    tokens = split_tokens(DataConfig(cache_dir=str(tmp_path)), tokenizer, progress=False)[:1025]
    result = perplexity(model, tokens, context=512, progress=False)
    assert result.n_scored == 1024 and result.n_windows == 3
    assert 5 < result.perplexity < 30  # the full validation split measures 21.3 (docs/RESULTS.md)
