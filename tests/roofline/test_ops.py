"""sparse_lm.roofline.ops and shapes: FLOPs and bytes of a tiny layer against hand-computed numbers."""

import pytest

from sparse_lm.models.config import Activation
from sparse_lm.roofline import Component, ModelShape, Phase, Precision, get_shape, ops

# D 8, F 16, 2 query heads of 4, 1 KV head (kv_dim 4), gated (ReGLU), RMSNorm, no biases.
TINY = ModelShape("tiny", n_layers=2, d_model=8, d_ff=16, n_heads=2, n_kv_heads=1, vocab_size=32,
                  activation=Activation.reglu)


def by_name(op_list):
    return {op.name: op for op in op_list}


def test_decode_attention_by_hand():
    attn = by_name(ops.attention_ops(TINY, Precision.fp16, phase=Phase.decode, context=4))
    q = attn["q_proj"]
    assert (q.flops, q.weight_bytes, q.activation_bytes, q.kv_bytes) == (2 * 8 * 8, 8 * 8 * 2, (8 + 8) * 2, 0)
    k = attn["k_proj"]  # 8 -> 4, and one new key of 4 f16 elements written to the cache
    assert (k.flops, k.weight_bytes, k.activation_bytes, k.kv_bytes) == (64, 64, 24, 8)
    qk = attn["qk"]  # 4 cached keys x 2 heads x 4 dims, reading the 4 x 4 f16 keys
    assert (qk.flops, qk.weight_bytes, qk.kv_bytes, qk.activation_bytes) == (2 * 4 * 2 * 4, 0, 32, (8 + 8) * 2)
    assert attn["attn_norm"].component is Component.norm
    assert attn["attn_norm"].weight_bytes == 8 * 4  # f32 RMSNorm weight, no bias


def test_prefill_attention_is_causal():
    attn = by_name(ops.attention_ops(TINY, Precision.fp16, phase=Phase.prefill, tokens=3))
    assert attn["qk"].flops == 2 * (3 * 4 / 2) * 2 * 4  # 6 query-key pairs per head
    assert attn["qk"].kv_bytes == 0
    assert attn["k_proj"].kv_bytes == 3 * 4 * 2
    assert attn["q_proj"].flops == 3 * 2 * 8 * 8


def test_sparse_ffn_reads_only_active_neurons():
    dense = by_name(ops.ffn_ops(TINY, Precision.fp16))
    half = by_name(ops.ffn_ops(TINY, Precision.fp16, active_fraction=0.5))
    for name in ("gate", "up", "down"):
        assert dense[name].weight_bytes == 8 * 16 * 2
        assert half[name].weight_bytes == 8 * 8 * 2
        assert half[name].flops == 2 * 8 * 8
    neuron_bytes = sum(op.weight_bytes for op in half.values() if op.component is Component.ffn)
    assert neuron_bytes == 8 * TINY.neuron_params * 2  # 8 active neurons x (gate row + up row + down column)
    assert half["ffn_norm"].weight_bytes == dense["ffn_norm"].weight_bytes  # the norm is never sparse


def test_ungated_ffn_and_int4_bytes():
    plain = ModelShape("plain", 1, 8, 16, 2, 2, 32, Activation.relu, biases=True, layernorm=True)
    ffn = by_name(ops.ffn_ops(plain, Precision.int4))
    assert "gate" not in ffn
    assert ffn["up"].weight_bytes == 8 * 16 * 18 / 32 + 16 * 4  # Q4_0 weights + f32 bias
    assert by_name(ops.attention_ops(plain, Precision.int4, phase=Phase.decode))["attn_norm"].weight_bytes == 2 * 8 * 4


def test_predictor_and_head():
    pred = by_name(ops.predictor_ops(TINY, Precision.fp16, rank=2))
    assert pred["pred_fc1"].weight_bytes == 8 * 2 * 2
    assert pred["pred_fc2"].weight_bytes == 2 * 16 * 2
    assert ops.predictor_ops(TINY, Precision.fp16, rank=0) == []
    assert ops.predictor_rank(TINY, 2 * 2 * (8 + 16)) == 2
    head = by_name(ops.head_ops(TINY, Precision.fp16, tokens=5))
    assert head["lm_head"].flops == 2 * 8 * 32  # logits of the last token only


def test_scaled_and_intensity():
    op = ops.Op("x", Component.ffn, flops=100.0, weight_bytes=40.0, activation_bytes=10.0)
    assert op.intensity == 2.0
    half = op.scaled(0.5)
    assert (half.flops, half.bytes) == (50.0, 25.0)
    with pytest.raises(ValueError, match="scale factor"):
        op.scaled(1.5)


@pytest.mark.parametrize("name, published", [
    ("opt_30b", 30.0e9), ("opt_66b", 66.0e9), ("opt_175b", 175.0e9), ("falcon_40b", 41.8e9),
    ("llama_reglu_13b", 13.0e9), ("llama_reglu_70b", 69.0e9), ("bamboo_7b", 7.24e9), ("smollm2_135m", 0.135e9),
])
def test_shapes_match_published_parameter_counts(name, published):
    assert get_shape(name).n_params == pytest.approx(published, rel=0.01)


def test_unknown_shape_names_itself():
    with pytest.raises(KeyError, match="opt_31b.*known shapes"):
        get_shape("opt_31b")
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelShape("bad", 1, 8, 16, 3, 2, 32, Activation.relu)
