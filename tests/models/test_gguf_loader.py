"""GGUF loading: round trips through tiny files written with gguf.GGUFWriter, metadata, and bad files."""

from __future__ import annotations

import re
import shutil

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm.models.config import Activation, NormKind, RopeLayout
from sparse_lm.models.gguf_loader import GGUFError, config_from_gguf, load_gguf, open_gguf, smollm2_gguf_path
from sparse_lm.models.presets import TINY
from sparse_lm.models.weights import CheckpointError
from tests.helpers import needs_smollm2
from tests.models.gguf_fixtures import (
    BOS_ID,
    BYTE_TOKENS,
    EOS_ID,
    MERGED_TOKENS,
    MODEL_NAME,
    SPECIAL_TOKENS,
    gguf_tensors,
    quantized,
    random_model,
    write_gguf,
    write_model_gguf,
)

# GGUF files carry Q/K rows permuted for interleaved RoPE; the loader derives tying from output.weight.
TIED = TINY.replace(rope_layout=RopeLayout.interleaved)
UNTIED = TIED.replace(tie_embeddings=False)
TOKENS = np.array([[5, 77, 300, 2, 511, 0, 128, 64, 9, 400, 33, 200]], np.int32)


def params(model) -> dict:
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def tied_model():
    return random_model(TIED, seed=3)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tied_model):
    return write_model_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tied_model)


@pytest.mark.parametrize("config", [TIED, UNTIED], ids=["tied", "untied"])
def test_f32_round_trip_gives_the_same_parameters_and_logits(tmp_path, config):
    source = random_model(config, seed=1)
    path = write_model_gguf(tmp_path / "tiny.gguf", source)
    loaded, _ = load_gguf(path, config=config)
    expected, actual = params(source), params(loaded)
    assert sorted(actual, key=str) == sorted(expected, key=str)
    for key, value in expected.items():
        np.testing.assert_array_equal(actual[key], value, err_msg=str(key))
    source_logits = np.asarray(source(jnp.asarray(TOKENS))[0])
    loaded_logits = np.asarray(loaded(jnp.asarray(TOKENS))[0])
    assert np.abs(loaded_logits - source_logits).max() < 1e-5
    assert np.abs(source_logits).max() > 0.1  # the comparison is not between near-zero logits


def test_config_from_metadata_reproduces_the_model(tiny_gguf, tied_model):
    loaded, _ = load_gguf(tiny_gguf)  # config=None: everything comes from the metadata
    # The file states head_dim and stores epsilon as float32; every other field is the source's.
    assert loaded.config == TIED.replace(
        name=MODEL_NAME,
        head_dim=16,
        norm_eps=float(np.float32(TIED.norm_eps)),
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    np.testing.assert_allclose(loaded(jnp.asarray(TOKENS))[0], tied_model(jnp.asarray(TOKENS))[0], rtol=0, atol=1e-5)


def test_config_from_gguf_reads_each_metadata_value(tmp_path):
    config = UNTIED.replace(n_layers=3, d_ff=96, norm_eps=1e-6, rope_base=50000.0, max_seq_len=320)
    path = write_gguf(tmp_path / "meta.gguf", config, gguf_tensors(random_model(config)))
    read = config_from_gguf(open_gguf(path))
    assert read.name == MODEL_NAME
    assert read.vocab_size == 512
    assert read.d_model == 64
    assert read.n_layers == 3
    assert read.n_heads == 4
    assert read.n_kv_heads == 2
    assert read.resolved_head_dim == 16
    assert read.d_ff == 96
    assert read.norm_eps == pytest.approx(1e-6, rel=1e-6)  # stored as float32
    assert read.rope_base == 50000.0
    assert read.max_seq_len == 320
    assert read.tie_embeddings is False
    assert read.rope_layout is RopeLayout.interleaved
    assert read.activation is Activation.swiglu
    assert read.norm is NormKind.rmsnorm
    assert (read.bos_token_id, read.eos_token_id) == (BOS_ID, EOS_ID)


def test_quantised_and_f16_tensors_are_dequantised(tmp_path, tied_model):
    tensors = gguf_tensors(tied_model)
    qtypes = {
        "blk.0.ffn_up.weight": gguf.GGMLQuantizationType.Q8_0,
        "token_embd.weight": gguf.GGMLQuantizationType.Q8_0,
        "blk.1.attn_q.weight": gguf.GGMLQuantizationType.F16,
    }
    path = write_model_gguf(tmp_path / "mixed.gguf", tied_model, qtypes=qtypes)
    loaded = params(load_gguf(path, config=TIED)[0])
    expected = {name: quantized(tensors[name], qtype) for name, qtype in qtypes.items()}
    for name, value in expected.items():
        # The file really holds a lossy copy, so equality below is not equality with the f32 source.
        assert not np.array_equal(value, tensors[name]), name
        np.testing.assert_allclose(value, tensors[name], rtol=0, atol=0.02 * np.abs(tensors[name]).max())
    # the model stores [in, out]: each file tensor appears transposed
    np.testing.assert_array_equal(loaded[("blocks", 0, "ffn", "w_up")].T, expected["blk.0.ffn_up.weight"])
    np.testing.assert_array_equal(loaded[("unembed",)].T, expected["token_embd.weight"])
    q_cols = TIED.n_heads * TIED.resolved_head_dim
    wqkv = loaded[("blocks", 1, "attn", "wqkv")]
    np.testing.assert_array_equal(wqkv[:, :q_cols].T, expected["blk.1.attn_q.weight"])
    # The neighbouring K columns of the same stacked parameter stay exact f32.
    np.testing.assert_array_equal(wqkv[:, q_cols : q_cols + 32].T, tensors["blk.1.attn_k.weight"])


def test_tokenizer_round_trips_text(tiny_gguf):
    _, tokenizer = load_gguf(tiny_gguf, config=TIED)
    vocab = [*SPECIAL_TOKENS, *BYTE_TOKENS, *MERGED_TOKENS]
    assert tokenizer.vocab_size == 512
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS_ID, EOS_ID)
    # "the" has no Ġ (no leading space), so only the "h e" merge applies; " and" merges all the way.
    assert tokenizer.encode("the and") == [vocab.index("t"), vocab.index("he"), vocab.index("Ġand")]
    assert tokenizer.encode("<|im_start|>hi") == [1, vocab.index("h"), vocab.index("i")]
    for text in ["In the beginning, and then: naïve café — “quotes” 中文 🙂\n\ttabs  ", "x", "  "]:
        ids = tokenizer.encode(text)
        assert all(0 <= i < 512 for i in ids)
        assert tokenizer.decode(ids) == text


# --- bad files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 4, 8, 100, 5000, 0.5, -300, -10, -1])
def test_truncated_file_names_the_file(tmp_path, tiny_gguf, keep):
    data = tiny_gguf.read_bytes()
    # The last tensor (blk.1.ffn_down, 32 KiB) ends on the alignment, so even -1 cuts tensor data.
    assert len(data) % 32 == 0
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data) if keep < 0 else keep
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:n])
    with pytest.raises(GGUFError) as info:
        load_gguf(path, config=TIED)
    message = str(info.value)
    assert str(path) in message
    # Fewer than 4 bytes cannot hold the magic; anything longer fails inside the reader.
    assert ("not a GGUF file" if n < 4 else "corrupt or truncated") in message


def test_wrong_magic_names_the_file(tmp_path, tiny_gguf):
    path = tmp_path / "magic.gguf"
    path.write_bytes(b"XXXX" + tiny_gguf.read_bytes()[4:])
    with pytest.raises(GGUFError) as info:
        load_gguf(path)
    message = str(info.value)
    assert str(path) in message
    assert "not a GGUF file" in message
    assert "b'XXXX'" in message


@pytest.mark.parametrize(
    "name, config",
    [
        ("blk.1.attn_k.weight", TIED),  # the middle of the stacked wqkv
        ("blk.0.ffn_down.weight", TIED),
        ("output_norm.weight", TIED),
        ("token_embd.weight", TIED),
        ("output.weight", UNTIED),  # an untied config needs the file's lm_head
    ],
)
def test_missing_tensor_is_named(tmp_path, name, config):
    path = write_model_gguf(tmp_path / "missing.gguf", random_model(config), omit=(name,))
    with pytest.raises(CheckpointError) as info:
        load_gguf(path, config=config)
    message = str(info.value)
    assert str(path) in message
    assert f"tensor {name!r} is missing" in message


@pytest.mark.parametrize(
    "name, wrong, right",
    [
        ("blk.0.ffn_gate.weight", (64, 128), (128, 64)),  # transposed
        ("blk.1.attn_v.weight", (64, 64), (32, 64)),  # as if n_kv_heads were n_heads
        ("output_norm.weight", (65,), (64,)),
    ],
)
def test_wrong_shape_names_tensor_and_both_shapes(tmp_path, tied_model, name, wrong, right):
    path = write_model_gguf(tmp_path / "shape.gguf", tied_model, shapes={name: wrong})
    with pytest.raises(CheckpointError) as info:
        load_gguf(path, config=TIED)
    message = str(info.value)
    assert str(path) in message
    assert repr(name) in message
    assert f"shape {wrong}" in message
    assert f"expects {right}" in message


def test_a_config_larger_than_the_file_names_the_tensor(tiny_gguf):
    with pytest.raises(CheckpointError, match=r"'token_embd.weight' has shape \(512, 64\).*expects \(1024, 64\)"):
        load_gguf(tiny_gguf, config=TIED.replace(vocab_size=1024))


def test_nonexistent_path_raises_file_not_found(tmp_path):
    path = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_gguf(path)


def test_tied_config_refuses_a_file_with_its_own_output_weight(tmp_path):
    path = write_model_gguf(tmp_path / "untied.gguf", random_model(UNTIED))
    with pytest.raises(CheckpointError, match="output.weight"):
        load_gguf(path, config=TIED)


def test_a_half_split_config_is_not_applied_to_gguf_weights(tiny_gguf, tied_model):
    try:
        loaded, _ = load_gguf(tiny_gguf, config=TIED.replace(rope_layout=RopeLayout.half_split))
    except CheckpointError as error:
        assert "rope" in str(error)
    else:
        np.testing.assert_allclose(
            loaded(jnp.asarray(TOKENS))[0], tied_model(jnp.asarray(TOKENS))[0], rtol=0, atol=1e-5
        )


# --- the real SmolLM2 file ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_reader():
    return open_gguf(smollm2_gguf_path())


@needs_smollm2
@pytest.mark.real_model
def test_real_smollm2_metadata(smollm2_reader):
    config = config_from_gguf(smollm2_reader)
    assert config.n_layers == 30
    assert config.d_model == 576
    assert config.d_ff == 1536
    assert (config.n_heads, config.n_kv_heads, config.resolved_head_dim) == (9, 3, 64)
    assert config.rope_base == 100000.0
    assert config.vocab_size == 49152
    assert config.tie_embeddings is True
    assert config.max_seq_len == 8192
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert config.norm_eps == pytest.approx(1e-5, rel=1e-6)
    assert config.rope_layout is RopeLayout.interleaved


@needs_smollm2
@pytest.mark.real_model
def test_real_smollm2_tensor_shapes_are_out_in(smollm2_reader):
    tensors = {t.name: t for t in smollm2_reader.tensors}
    for name, shape in [
        ("blk.0.ffn_gate.weight", (1536, 576)),
        ("blk.0.ffn_down.weight", (576, 1536)),
        ("blk.0.attn_k.weight", (192, 576)),
    ]:
        tensor = tensors[name]
        assert gguf.quants.dequantize(tensor.data, tensor.tensor_type).shape == shape


@needs_smollm2
@pytest.mark.real_model
def test_real_smollm2_truncated_copy_names_the_file(tmp_path):
    source = smollm2_gguf_path()
    path = tmp_path / "smollm2-truncated.gguf"
    size = source.stat().st_size
    with open(source, "rb") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.truncate(int(size * 0.6))
    with pytest.raises(GGUFError) as info:
        load_gguf(path)
    assert str(path) in str(info.value)
    assert "corrupt or truncated" in str(info.value)
