"""Hugging Face safetensors: save/load round trips, config.json, and files that do not fit the model."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from sparse_lm.models.config import Activation, NormKind, RopeLayout
from sparse_lm.models.presets import TINY
from sparse_lm.models.safetensors_loader import config_from_hf_json, load_safetensors, save_safetensors
from sparse_lm.models.weights import CheckpointError
from tests.models.gguf_fixtures import random_model

UNTIED = TINY.replace(tie_embeddings=False)
TOKENS = jnp.asarray([[5, 77, 300, 2, 511, 0, 128, 64, 9, 400, 33, 200]], jnp.int32)
HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 50000.0,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


def params(model) -> dict:
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_model(actual, expected):
    want, got = params(expected), params(actual)
    assert sorted(got, key=str) == sorted(want, key=str)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=str(key))
    source_logits = np.asarray(expected(TOKENS)[0])
    np.testing.assert_array_equal(np.asarray(actual(TOKENS)[0]), source_logits)
    assert np.abs(source_logits).max() > 0.1


@pytest.fixture(scope="module")
def untied_file(tmp_path_factory):
    """(source model, path) of an untied TINY model saved with HF names."""
    model = random_model(UNTIED, seed=2)
    return model, save_safetensors(model, tmp_path_factory.mktemp("st") / "model.safetensors")


@pytest.mark.parametrize("config", [TINY, UNTIED], ids=["tied", "untied"])
def test_round_trip_gives_identical_parameters_and_logits(tmp_path, config):
    assert config.rope_layout is RopeLayout.half_split
    source = random_model(config, seed=1)
    path = save_safetensors(source, tmp_path / "sub" / "model.safetensors")
    with safetensors.safe_open(path, framework="numpy") as f:
        names = set(f.keys())
        down = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert ("lm_head.weight" in names) is not config.tie_embeddings
    assert len(names) == 2 + 9 * config.n_layers + (0 if config.tie_embeddings else 1)
    assert down.shape == (64, 128)  # HF [out, in], though the model keeps W_down as [F, D]
    assert_same_model(load_safetensors(path, config), source)


def test_config_json_beside_the_file(tmp_path, untied_file):
    source, saved = untied_file
    path = tmp_path / "model.safetensors"
    path.write_bytes(saved.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    config = config_from_hf_json(tmp_path / "config.json")
    assert config.name == "hf_llama"
    assert (config.vocab_size, config.d_model, config.d_ff, config.n_layers) == (512, 64, 128, 2)
    assert (config.n_heads, config.n_kv_heads, config.resolved_head_dim) == (4, 2, 16)
    assert config.activation is Activation.swiglu
    assert config.norm is NormKind.rmsnorm
    assert config.norm_eps == 1e-6
    assert config.rope_base == 50000.0
    assert config.rope_layout is RopeLayout.half_split
    assert config.tie_embeddings is False
    assert config.max_seq_len == 256
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)

    loaded = load_safetensors(path)  # config=None reads config.json
    assert loaded.config == config
    want, got = params(source), params(loaded)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=str(key))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"hidden_size": None}, "key 'hidden_size' is missing"),
        ({"num_attention_heads": None}, "key 'num_attention_heads' is missing"),
    ],
)
def test_bad_config_json_is_named(tmp_path, changes, message):
    hf = {k: v for k, v in {**HF_CONFIG, **changes}.items() if v is not None}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    with pytest.raises(CheckpointError) as info:
        config_from_hf_json(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_hf_relu_activation_maps_to_reglu(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**HF_CONFIG, "hidden_act": "relu"}))
    assert config_from_hf_json(path).activation is Activation.reglu


def test_missing_config_json_names_it(tmp_path, untied_file):
    path = tmp_path / "model.safetensors"
    path.write_bytes(untied_file[1].read_bytes())
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "config.json"))):
        load_safetensors(path)


def _tensors(path) -> dict[str, np.ndarray]:
    with safetensors.safe_open(path, framework="numpy") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.mark.parametrize("name", ["model.layers.1.self_attn.k_proj.weight", "model.norm.weight", "lm_head.weight"])
def test_missing_tensor_is_named(tmp_path, untied_file, name):
    tensors = _tensors(untied_file[1])
    del tensors[name]
    path = tmp_path / "missing.safetensors"
    safetensors.numpy.save_file(tensors, str(path))
    with pytest.raises(CheckpointError) as info:
        load_safetensors(path, UNTIED)
    assert str(path) in str(info.value)
    assert f"tensor {name!r} is missing" in str(info.value)


@pytest.mark.parametrize(
    "name, wrong, right",
    [
        ("model.layers.0.mlp.down_proj.weight", (128, 64), (64, 128)),  # saved in the model's [F, D] order
        ("model.layers.1.self_attn.v_proj.weight", (64, 64), (32, 64)),
        ("model.embed_tokens.weight", (256, 64), (512, 64)),
    ],
)
def test_wrong_shape_names_tensor_and_both_shapes(tmp_path, untied_file, name, wrong, right):
    tensors = _tensors(untied_file[1])
    tensors[name] = np.random.default_rng(0).standard_normal(wrong).astype(np.float32)
    path = tmp_path / "shape.safetensors"
    safetensors.numpy.save_file(tensors, str(path))
    with pytest.raises(CheckpointError) as info:
        load_safetensors(path, UNTIED)
    message = str(info.value)
    assert str(path) in message
    assert repr(name) in message
    assert f"shape {wrong}" in message
    assert f"expects {right}" in message


def test_float16_tensors_are_widened(tmp_path, untied_file):
    tensors = _tensors(untied_file[1])
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name].astype(np.float16)
    path = tmp_path / "half.safetensors"
    safetensors.numpy.save_file(tensors, str(path))
    loaded = params(load_safetensors(path, UNTIED))
    np.testing.assert_array_equal(loaded[("blocks", 0, "ffn", "w_up")].T, tensors[name].astype(np.float32))


@pytest.mark.parametrize("keep", [0, 7, 8, 100, 0.5, -10, -1])
def test_truncated_file_names_the_file(tmp_path, untied_file, keep):
    data = untied_file[1].read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data) if keep < 0 else keep
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError) as info:
        load_safetensors(path, UNTIED)
    assert str(path) in str(info.value)
    assert "corrupt or truncated" in str(info.value)


def test_garbage_file_names_the_file(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError) as info:
        load_safetensors(path, UNTIED)
    assert str(path) in str(info.value)
    assert "corrupt or truncated" in str(info.value)


def test_nonexistent_path_raises_file_not_found(tmp_path):
    path = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_safetensors(path, UNTIED)


def test_tied_config_refuses_a_file_with_its_own_lm_head(untied_file):
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_safetensors(untied_file[1], TINY)


def test_an_interleaved_config_is_refused(tmp_path):
    source = random_model(TINY, seed=1)
    path = save_safetensors(source, tmp_path / "model.safetensors")
    try:
        loaded = load_safetensors(path, TINY.replace(rope_layout=RopeLayout.interleaved))
    except CheckpointError as error:
        assert "rope" in str(error)
    else:
        np.testing.assert_array_equal(np.asarray(loaded(TOKENS)[0]), np.asarray(source(TOKENS)[0]))
