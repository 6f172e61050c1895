"""Loads Hugging Face LLaMA checkpoints (safetensors, HF tensor names; RoPE in the half-split layout)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

from sparse_lm.models.config import Activation, ModelConfig, NormKind, RopeLayout
from sparse_lm.models.transformer import Transformer
from sparse_lm.models.weights import HF_LLAMA_NAMING, CheckpointError, build_from_tensors, checkpoint_tensors


def config_from_hf_json(path: str | os.PathLike, name: str = "hf_llama") -> ModelConfig:
    """ModelConfig from a Hugging Face LLaMA `config.json`."""
    path = Path(path)
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read Hugging Face config ({e})") from e
    act = hf.get("hidden_act", "silu")
    activation = {"silu": Activation.swiglu, "relu": Activation.reglu}.get(act)
    if activation is None:
        raise CheckpointError(f"{path}: hidden_act={act!r} is not supported (silu or relu)")
    try:
        n_heads = hf["num_attention_heads"]
        return ModelConfig(
            name=name,
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads", n_heads),
            head_dim=hf.get("head_dim", 0) or 0,
            d_ff=hf["intermediate_size"],
            activation=activation,
            norm=NormKind.rmsnorm,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_base=hf.get("rope_theta", 10000.0),
            rope_layout=RopeLayout.half_split,
            tie_embeddings=hf.get("tie_word_embeddings", False),
            max_seq_len=hf.get("max_position_embeddings", 2048),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id") if isinstance(hf.get("eos_token_id"), int) else None,
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: key {e.args[0]!r} is missing") from None


def load_safetensors(path: str | os.PathLike, config: ModelConfig | None = None) -> Transformer:
    """A Transformer from one safetensors file with HF LLaMA names.

    Args:
      path: the `.safetensors` file.
      config: the model's config; None reads `config.json` beside the file. Its RoPE layout is set to
        half-split, since HF checkpoints are not permuted the way GGUF files are.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    if config is None:
        config = config_from_hf_json(path.with_name("config.json"))
    # Hugging Face checkpoints keep Q/K rows unpermuted: the half-split layout, whatever the preset says.
    config = config.replace(rope_layout=RopeLayout.half_split)
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            names = set(f.keys())
            arrays = {name: f.get_tensor(name) for name in names}
    except Exception as e:  # safetensors raises its own error types for a bad header or truncated data
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({type(e).__name__}: {e})") from e

    def get_tensor(name: str) -> np.ndarray | None:
        array = arrays.get(name)
        return None if array is None else array.astype(np.float32)

    return build_from_tensors(config, HF_LLAMA_NAMING, get_tensor, str(path))


def save_safetensors(model: Transformer, path: str | os.PathLike) -> Path:
    """Writes `model` with HF LLaMA names (float32), the inverse of `load_safetensors`."""
    path = Path(path)
    tensors = checkpoint_tensors(model, HF_LLAMA_NAMING)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, str(path))
    return path
