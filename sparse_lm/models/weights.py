"""Maps checkpoint tensors (PyTorch [out, in] order) onto the NNX Transformer's parameters.

GGUF and Hugging Face safetensors name tensors differently but store them alike; one table of slots per
naming scheme places each tensor. The model stores every matrix [in, out], so each is transposed; Q, K
and V are stacked into one wqkv. W_down thereby becomes [F, D], a neuron per row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_lm.models.config import ModelConfig, NormKind
from sparse_lm.models.transformer import Transformer


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the file and the tensor."""


@dataclasses.dataclass(frozen=True)
class Naming:
    """Tensor-name templates of one checkpoint format ({i} is the layer index)."""

    embed: str
    final_norm: str
    lm_head: str
    attn_norm: str
    ffn_norm: str
    wq: str
    wk: str
    wv: str
    wo: str
    w_gate: str
    w_up: str
    w_down: str


GGUF_NAMING = Naming(
    embed="token_embd.weight", final_norm="output_norm.weight", lm_head="output.weight",
    attn_norm="blk.{i}.attn_norm.weight", ffn_norm="blk.{i}.ffn_norm.weight",
    wq="blk.{i}.attn_q.weight", wk="blk.{i}.attn_k.weight", wv="blk.{i}.attn_v.weight",
    wo="blk.{i}.attn_output.weight", w_gate="blk.{i}.ffn_gate.weight", w_up="blk.{i}.ffn_up.weight",
    w_down="blk.{i}.ffn_down.weight",
)

HF_LLAMA_NAMING = Naming(
    embed="model.embed_tokens.weight", final_norm="model.norm.weight", lm_head="lm_head.weight",
    attn_norm="model.layers.{i}.input_layernorm.weight", ffn_norm="model.layers.{i}.post_attention_layernorm.weight",
    wq="model.layers.{i}.self_attn.q_proj.weight", wk="model.layers.{i}.self_attn.k_proj.weight",
    wv="model.layers.{i}.self_attn.v_proj.weight", wo="model.layers.{i}.self_attn.o_proj.weight",
    w_gate="model.layers.{i}.mlp.gate_proj.weight", w_up="model.layers.{i}.mlp.up_proj.weight",
    w_down="model.layers.{i}.mlp.down_proj.weight",
)


@dataclasses.dataclass(frozen=True)
class Slot:
    """Checkpoint tensors stacked along axis 0 into one parameter (optionally transposed afterwards).

    Attributes:
      names: tensor names, stacked in this order (one name for most parameters; Q, K, V for wqkv).
      file_shapes: each tensor's expected shape in the file, [out, in].
    """

    names: tuple[str, ...]
    file_shapes: tuple[tuple[int, ...], ...]
    transpose: bool = False

    @classmethod
    def single(cls, name: str, file_shape: tuple[int, ...], transpose: bool = False) -> Slot:
        return cls((name,), (file_shape,), transpose)


def tensor_slots(config: ModelConfig, naming: Naming) -> dict[tuple, Slot]:
    """Parameter path in the NNX state -> checkpoint slot, for every parameter of `config`."""
    if config.norm is not NormKind.rmsnorm:
        raise CheckpointError(f"checkpoint loading supports RMSNorm models only, not {config.norm.value}")
    c, n = config, naming
    d, f, hd = c.d_model, c.d_ff, c.resolved_head_dim
    slots = {("final_norm", "scale"): Slot.single(n.final_norm, (d,))}
    if c.tie_embeddings:
        slots[("unembed",)] = Slot.single(n.embed, (c.vocab_size, d), transpose=True)
    else:
        slots[("embed",)] = Slot.single(n.embed, (c.vocab_size, d))
        slots[("unembed",)] = Slot.single(n.lm_head, (c.vocab_size, d), transpose=True)
    q_rows, kv_rows = c.n_heads * hd, c.n_kv_heads * hd
    for i in range(c.n_layers):
        b = ("blocks", i)
        slots[(*b, "attn_norm", "scale")] = Slot.single(n.attn_norm.format(i=i), (d,))
        slots[(*b, "ffn_norm", "scale")] = Slot.single(n.ffn_norm.format(i=i), (d,))
        slots[(*b, "attn", "wqkv")] = Slot(
            (n.wq.format(i=i), n.wk.format(i=i), n.wv.format(i=i)),
            ((q_rows, d), (kv_rows, d), (kv_rows, d)),
            transpose=True,
        )
        slots[(*b, "attn", "wo")] = Slot.single(n.wo.format(i=i), (d, q_rows), transpose=True)
        if c.activation.gated:
            slots[(*b, "ffn", "w_gate")] = Slot.single(n.w_gate.format(i=i), (f, d), transpose=True)
        slots[(*b, "ffn", "w_up")] = Slot.single(n.w_up.format(i=i), (f, d), transpose=True)
        slots[(*b, "ffn", "w_down")] = Slot.single(n.w_down.format(i=i), (d, f), transpose=True)
    return slots


def build_from_tensors(
    config: ModelConfig,
    naming: Naming,
    get_tensor: Callable[[str], np.ndarray | None],
    source: str,
) -> Transformer:
    """A Transformer whose parameters come from `get_tensor(name)` (float32 [out, in], None if absent).

    A tied config refuses a checkpoint whose own output head differs from its embedding: loading it
    would silently compute other logits than the checkpoint's.
    """
    if config.tie_embeddings:
        head = get_tensor(naming.lm_head)
        if head is not None:
            embedding = get_tensor(naming.embed)
            if embedding is None or head.shape != embedding.shape or not np.array_equal(head, embedding):
                raise CheckpointError(
                    f"{source}: tensor {naming.lm_head!r} is a separate output head, but the config "
                    f"({config.name}) ties it to the embedding; use an untied config"
                )
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    slots = tensor_slots(config, naming)
    unmapped = sorted(set(flat) - set(slots), key=str)
    if unmapped:
        raise CheckpointError(f"{source}: no tensor maps to model parameters {unmapped[:4]}")
    for key, slot in slots.items():
        parts = []
        for name, file_shape in zip(slot.names, slot.file_shapes, strict=True):
            array = get_tensor(name)
            if array is None:
                raise CheckpointError(f"{source}: tensor {name!r} is missing")
            if tuple(array.shape) != file_shape:
                raise CheckpointError(
                    f"{source}: tensor {name!r} has shape {tuple(array.shape)}, the config "
                    f"({config.name}) expects {file_shape}"
                )
            parts.append(np.asarray(array, np.float32))
        array = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        flat[key].set_value(jnp.asarray(array.T if slot.transpose else array))
    nnx.update(model, nnx.from_flat_state(flat))
    assert not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(model)))
    return model


def checkpoint_tensors(model: Transformer, naming: Naming) -> dict[str, np.ndarray]:
    """The inverse of `build_from_tensors`: the model's parameters as float32 [out, in] checkpoint tensors."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    tensors = {}
    for key, slot in tensor_slots(model.config, naming).items():
        array = np.asarray(flat[key].get_value(), np.float32)
        array = array.T if slot.transpose else array
        offsets = np.cumsum([shape[0] for shape in slot.file_shapes])[:-1]
        for name, part in zip(slot.names, np.split(array, offsets, axis=0), strict=True):
            tensors[name] = np.ascontiguousarray(part)
    return tensors
