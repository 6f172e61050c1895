"""Generation: greedy equals the full-forward argmax, nucleus sampling, the real model's answer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm.eval.generate import Generator, SamplingConfig, prompt_bucket, sample_token
from sparse_lm.models.presets import TINY
from sparse_lm.models.transformer import Transformer
from tests.helpers import needs_smollm2


def test_prompt_bucket():
    assert [prompt_bucket(n) for n in (1, 16, 17, 100, 128, 129)] == [16, 16, 32, 128, 128, 256]


def test_greedy_generation_equals_full_forward_argmax():
    model = Transformer(TINY, rngs=nnx.Rngs(5))
    prompt = [10, 20, 30, 40, 50]
    result = Generator(model, capacity=32).generate(prompt, 8)
    sequence = list(prompt)
    for _ in range(8):
        logits, _ = model(jnp.asarray([sequence]))
        sequence.append(int(jnp.argmax(logits[0, -1])))
    assert result.tokens == sequence[len(prompt) :]
    assert result.prompt_tokens == 5 and result.decode_tokens_per_s > 0


def test_generation_stops_at_the_stop_token():
    model = Transformer(TINY, rngs=nnx.Rngs(5))
    first = Generator(model, capacity=32).generate([1, 2, 3], 1).tokens[0]
    result = Generator(model, capacity=32).generate([1, 2, 3], 10, stop_token=first)
    assert result.tokens == [first]


def test_capacity_and_prompt_checks():
    generator = Generator(Transformer(TINY, rngs=nnx.Rngs(0)), capacity=20)
    with pytest.raises(ValueError, match="cache capacity"):
        generator.generate([1, 2, 3], 10)  # bucket 16 + 10 > 20
    with pytest.raises(ValueError, match="non-empty"):
        generator.generate([], 1)


def test_top_p_keeps_only_the_nucleus():
    logits = jnp.log(jnp.array([[0.6, 0.3, 0.05, 0.05]]))
    draws = [int(sample_token(logits, jax.random.key(i), 1.0, 0.8)[0]) for i in range(200)]
    assert set(draws) == {0, 1}  # 0.6 + 0.3 reaches 0.8; the tail is never drawn
    share = draws.count(0) / len(draws)
    assert 0.55 < share < 0.80  # renormalised: 0.6 / 0.9 = 0.67
    tiny_p = [int(sample_token(logits, jax.random.key(i), 1.0, 0.1)[0]) for i in range(20)]
    assert set(tiny_p) == {0}


def test_temperature_sampling_follows_the_distribution():
    logits = jnp.log(jnp.array([[0.7, 0.2, 0.1]]))
    keys = jax.random.split(jax.random.key(0), 2000)
    draws = np.asarray(jax.vmap(lambda k: sample_token(logits, k, 1.0, 1.0))(keys))[:, 0]
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / 2000, [0.7, 0.2, 0.1], atol=0.03)
    assert int(sample_token(logits, keys[0], 0.0, 1.0)[0]) == 0


def test_sampling_config_validation():
    with pytest.raises(ValueError, match="sampling.top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="sampling.temperature"):
        SamplingConfig(temperature=-1.0)


@needs_smollm2
@pytest.mark.real_model
def test_smollm2_knows_the_capital_of_france(smollm2):
    model, tokenizer = smollm2
    result = Generator(model, capacity=48).generate(tokenizer.encode("The capital of France is"), 12)
    assert "Paris" in tokenizer.decode(result.tokens)
