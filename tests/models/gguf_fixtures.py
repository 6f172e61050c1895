"""Writes small LLaMA GGUF files (TINY shapes, byte-level BPE tokenizer) the way llama.cpp's converter does.

Tensors are written in PyTorch [out, in] numpy order; GGUF records dimensions innermost first, so
`GGUFWriter` reverses the numpy shape into `ne` and `GGUFReader` reverses it back. The model's parameters
become tensors by the inverse of `weights.tensor_slots`: wqkv is split into Q, K and V rows, W_down is
transposed back to [D, F].
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import gguf
import jax
import numpy as np
from flax import nnx

from sparse_lm.models.config import ModelConfig
from sparse_lm.models.transformer import Transformer
from sparse_lm.models.weights import GGUF_NAMING, checkpoint_tensors

ARCH = "llama"
MODEL_NAME = "tiny-gguf-test"
RMS_EPS = 1e-5
ROPE_BASE = 10000.0

# Vocabulary: control tokens first (like SmolLM2), then the 256 byte tokens, then merged tokens, then
# reserved control tokens up to the model's vocab_size.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID = 1, 2
# Each merge joins two tokens already in the vocabulary (bytes or earlier merges); "Ġ" is the space byte.
MERGES = ("Ġ t", "h e", "Ġt he", "i n", "Ġ a", "a n", "Ġa n", "Ġan d", "o u", "e r")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


BYTE_TOKENS = tuple(bytes_to_unicode()[b] for b in range(256))
MERGED_TOKENS = tuple(m.replace(" ", "") for m in MERGES)


def vocabulary(vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and llama.cpp token types (1 normal, 3 control) filling `vocab_size` ids."""
    tokens = [*SPECIAL_TOKENS, *BYTE_TOKENS, *MERGED_TOKENS]
    types = [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS) + [gguf.TokenType.NORMAL] * (
        len(BYTE_TOKENS) + len(MERGED_TOKENS)
    )
    if len(tokens) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(tokens)} fixture tokens")
    reserved = [f"<|reserved_{i}|>" for i in range(vocab_size - len(tokens))]
    return tokens + reserved, [int(t) for t in types] + [int(gguf.TokenType.CONTROL)] * len(reserved)


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """A Transformer whose every parameter, norm scales included, is random (no all-ones vectors)."""
    model = Transformer(config, rngs=nnx.Rngs(seed))
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    keys = jax.random.split(jax.random.key(seed + 1), len(flat))
    for key, (path, variable) in zip(keys, sorted(flat.items(), key=lambda kv: str(kv[0])), strict=True):
        if path[-1] == "scale":
            variable.set_value(jax.random.uniform(key, variable.shape, minval=0.5, maxval=1.5))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def gguf_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """The model's parameters as GGUF tensors (float32, [out, in]), keyed by GGUF name, in slot order."""
    return checkpoint_tensors(model, GGUF_NAMING)


def quantized(array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """`array` as stored in a file of type `qtype` and read back (float32), what a loader should return."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return array.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype).astype(np.float32)


def write_gguf(
    path: str | os.PathLike,
    config: ModelConfig,
    tensors: Mapping[str, np.ndarray],
    *,
    omit: tuple[str, ...] = (),
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    qtypes: Mapping[str, gguf.GGMLQuantizationType] | None = None,
    add_bos: bool = False,
) -> Path:
    """Writes a LLaMA GGUF with `config`'s metadata, the fixture tokenizer and `tensors`.

    Args:
      tensors: float32 [out, in] arrays by GGUF name (see `gguf_tensors`).
      omit: tensor names to leave out of the file.
      shapes: tensor name -> a (wrong) shape; that tensor is written as random values of this shape.
      qtypes: tensor name -> F16 or a quantised type (e.g. Q8_0); the rest are F32.
      add_bos: value of `tokenizer.ggml.add_bos_token`.
    """
    path = Path(path)
    shapes, qtypes = dict(shapes or {}), dict(qtypes or {})
    unknown = (set(omit) | set(shapes) | set(qtypes)) - set(tensors)
    if unknown:
        raise KeyError(f"not tensors of this model: {sorted(unknown)}")
    writer = gguf.GGUFWriter(path, ARCH)
    writer.add_string("general.name", MODEL_NAME)
    writer.add_uint32(f"{ARCH}.block_count", config.n_layers)
    writer.add_uint32(f"{ARCH}.context_length", config.max_seq_len)
    writer.add_uint32(f"{ARCH}.embedding_length", config.d_model)
    writer.add_uint32(f"{ARCH}.feed_forward_length", config.d_ff)
    writer.add_uint32(f"{ARCH}.attention.head_count", config.n_heads)
    writer.add_uint32(f"{ARCH}.attention.head_count_kv", config.n_kv_heads)
    writer.add_uint32(f"{ARCH}.rope.dimension_count", config.resolved_head_dim)
    writer.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", config.norm_eps)
    writer.add_float32(f"{ARCH}.rope.freq_base", config.rope_base)
    writer.add_uint32(f"{ARCH}.vocab_size", config.vocab_size)
    tokens, token_types = vocabulary(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(list(MERGES))
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_bool("tokenizer.ggml.add_bos_token", add_bos)

    rng = np.random.default_rng(0)
    for name, array in tensors.items():
        if name in omit:
            continue
        if name in shapes:
            array = rng.standard_normal(shapes[name]).astype(np.float32)
        qtype = qtypes.get(name, gguf.GGMLQuantizationType.F32)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, np.ascontiguousarray(array, np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_model_gguf(path: str | os.PathLike, model: Transformer, **options) -> Path:
    """`write_gguf` of `model`'s own config and parameters (options as in `write_gguf`)."""
    return write_gguf(path, model.config, gguf_tensors(model), **options)
