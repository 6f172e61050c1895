"""Model building blocks on hand-computed values, KV-cache decoding, configs and paper-size shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm.models.attention import causal_attention
from sparse_lm.models.config import Activation, ModelConfig, NormKind, RopeLayout
from sparse_lm.models.ffn import FFN, activation_pair, apply_threshold
from sparse_lm.models.layers import apply_rope, layer_norm, rms_norm, rope_angles
from sparse_lm.models.presets import PRESETS, PUBLISHED_PARAMS, TINY, get_preset
from sparse_lm.models.transformer import Transformer, abstract_model, count_params, init_cache

GATE = jnp.array([-2.0, -0.5, 0.0, 0.5, 2.0])
UP = jnp.array([3.0, -1.0, 4.0, -2.0, -0.5])


@pytest.mark.parametrize(
    "activation, expected",
    [
        (
            Activation.swiglu,
            [
                -2 / (1 + np.exp(2)) * 3,
                -0.5 / (1 + np.exp(0.5)) * -1,
                0.0,
                0.5 / (1 + np.exp(-0.5)) * -2,
                2 / (1 + np.exp(-2)) * -0.5,
            ],
        ),
        (Activation.reglu, [0.0, 0.0, 0.0, -1.0, -1.0]),
        (Activation.drelu, [0.0, 0.0, 0.0, 0.0, 0.0]),
        (Activation.relu, [3.0, 0.0, 4.0, 0.0, 0.0]),
        (Activation.relu2, [9.0, 0.0, 16.0, 0.0, 0.0]),
    ],
)
def test_activation_pairs_hand_computed(activation, expected):
    gate = GATE if activation.gated else None
    np.testing.assert_allclose(activation_pair(activation, gate, UP), expected, rtol=1e-6, atol=1e-7)


def test_drelu_keeps_only_both_positive():
    gate, up = jnp.array([1.0, 2.0, -1.0, 3.0]), jnp.array([2.0, -1.0, 5.0, 0.5])
    np.testing.assert_allclose(activation_pair(Activation.drelu, gate, up), [2.0, 0.0, 0.0, 1.5])


def test_threshold_zeroes_small_magnitudes():
    hidden = jnp.array([0.05, -0.2, 0.3, -0.01, 1.0])
    np.testing.assert_allclose(apply_threshold(hidden, 0.1), [0.0, -0.2, 0.3, 0.0, 1.0])
    np.testing.assert_allclose(apply_threshold(hidden, None), hidden)


def test_ffn_matches_dense_formula_and_threshold_config():
    ffn = FFN(8, 16, Activation.reglu, threshold=0.05, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(0), (2, 8))
    hidden = jax.nn.relu(x @ ffn.w_gate[...]) * (x @ ffn.w_up[...])
    hidden = jnp.where(jnp.abs(hidden) > 0.05, hidden, 0.0)
    np.testing.assert_allclose(ffn(x), hidden @ ffn.w_down[...], rtol=1e-5, atol=1e-6)
    assert ffn.w_down.shape == (16, 8)  # neurons are rows


def test_norms_hand_computed():
    x = jnp.array([[1.0, 2.0, 3.0, 4.0]])
    rms = np.sqrt((1 + 4 + 9 + 16) / 4 + 1e-6)
    np.testing.assert_allclose(
        rms_norm(x, jnp.array([1.0, 1.0, 2.0, 1.0]), 1e-6), [[1 / rms, 2 / rms, 6 / rms, 4 / rms]], rtol=1e-6
    )
    std = np.sqrt(1.25 + 1e-6)
    np.testing.assert_allclose(
        layer_norm(x, jnp.ones(4), jnp.full(4, 0.5), 1e-6),
        [[-1.5 / std + 0.5, -0.5 / std + 0.5, 0.5 / std + 0.5, 1.5 / std + 0.5]],
        rtol=1e-6,
    )


def test_rope_rotates_the_right_pairs():
    """Position 1, head_dim 4, base 100: angles (1, 0.1). Interleaved rotates (x0,x1),(x2,x3);
    half-split rotates (x0,x2),(x1,x3)."""
    x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    cos, sin = rope_angles(jnp.array([[1]]), 4, 100.0)
    c0, s0, c1, s1 = np.cos(1.0), np.sin(1.0), np.cos(0.1), np.sin(0.1)
    inter = apply_rope(x, cos, sin, RopeLayout.interleaved).reshape(4)
    np.testing.assert_allclose(inter, [1 * c0 - 2 * s0, 1 * s0 + 2 * c0, 3 * c1 - 4 * s1, 3 * s1 + 4 * c1], rtol=1e-6)
    half = apply_rope(x, cos, sin, RopeLayout.half_split).reshape(4)
    np.testing.assert_allclose(half, [1 * c0 - 3 * s0, 2 * c1 - 4 * s1, 3 * c0 + 1 * s0, 4 * c1 + 2 * s1], rtol=1e-6)


def test_rope_position_zero_is_identity_and_norm_preserving():
    x = jax.random.normal(jax.random.key(1), (1, 3, 2, 8))
    cos, sin = rope_angles(jnp.array([[0, 5, 77]]), 8, 10000.0)
    for layout in RopeLayout:
        out = apply_rope(x, cos, sin, layout)
        np.testing.assert_allclose(out[:, 0], x[:, 0], rtol=1e-6)
        np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_grouped_query_attention_matches_repeated_heads():
    key = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(key[0], (1, 5, 4, 8))
    k = jax.random.normal(key[1], (1, 5, 2, 8))
    v = jax.random.normal(key[2], (1, 5, 2, 8))
    positions = jnp.arange(5)[None]
    out = causal_attention(q, k, v, positions, jnp.arange(5))
    # multi-head reference: query head h reads key/value head h // 2
    for h in range(4):
        scores = q[0, :, h] @ k[0, :, h // 2].T / np.sqrt(8)
        scores = jnp.where(jnp.tril(jnp.ones((5, 5), bool)), scores, -jnp.inf)
        np.testing.assert_allclose(out[0, :, h], jax.nn.softmax(scores) @ v[0, :, h // 2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", list(Activation))
def test_kv_cache_decode_equals_full_forward(activation):
    config = TINY.replace(activation=activation, n_layers=3)
    model = Transformer(config, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(4), (2, 12), 0, config.vocab_size)
    full, _ = model(tokens)
    cache = init_cache(config, batch=2, capacity=16)
    prefill, cache = model(tokens[:, :5], cache)
    steps = [prefill]
    for i in range(5, 12):
        logits, cache = model(tokens[:, i : i + 1], cache)
        steps.append(logits)
    assert int(cache.length) == 12
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-4)


def test_causality_future_tokens_do_not_change_past_logits():
    model = Transformer(TINY, rngs=nnx.Rngs(1))
    a = jnp.array([[5, 6, 7, 8, 9]])
    b = a.at[0, 4].set(100)
    np.testing.assert_allclose(model(a)[0][:, :4], model(b)[0][:, :4], rtol=1e-6)
    assert not np.allclose(model(a)[0][:, 4], model(b)[0][:, 4])


def test_param_count_formula_matches_built_model():
    for config in (TINY, TINY.replace(activation=Activation.relu, norm=NormKind.layernorm, tie_embeddings=False)):
        assert count_params(Transformer(config, rngs=nnx.Rngs(0))) == config.param_count()


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_paper_size_shapes_match_published_counts(name):
    model = abstract_model(get_preset(name))  # shapes only: nothing allocated
    leaves = jax.tree.leaves(nnx.state(model))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    assert abs(count_params(model) / PUBLISHED_PARAMS[name] - 1) < 0.01


def test_smollm2_preset_count():
    assert count_params(abstract_model(PRESETS["smollm2_135m"])) == 134_515_008


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"d_model": 0}, "model.d_model"),
        ({"n_heads": 3, "n_kv_heads": 2, "d_model": 63}, "model.n_heads=3 must be a multiple"),
        ({"d_model": 65}, "not divisible"),
        ({"activation": "gelu"}, "model.activation='gelu'"),
        ({"ffn_thresholds": (0.1, 0.2, 0.3)}, "model.ffn_thresholds has 3 values"),
        ({"ffn_thresholds": (-0.1,)}, "model.ffn_thresholds must be >= 0"),
        ({"rope_base": 1.0}, "model.rope_base"),
    ],
)
def test_config_validation_names_the_key(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**{**TINY.__dict__, **changes})


def test_unknown_preset_lists_known_ones():
    with pytest.raises(KeyError, match="smollm2_135m"):
        get_preset("llama9")


def test_cache_capacity_checked():
    with pytest.raises(ValueError, match="max_seq_len"):
        init_cache(TINY, 1, TINY.max_seq_len + 1)
