"""Per-op FLOPs and bytes of a decoder layer for prefill and decode, dense or sparse (LLM-Viewer's accounting).

Each op lists its floating-point operations (a multiply-add is 2), the weight bytes it reads, the activation bytes
it reads and writes, and the KV-cache bytes it reads and writes. Weight matrices are stored at the model's
`Precision` (Q4_0 int4 = 0.5625 bytes a weight, scales included); norm weights are f32; activations f16 (f32 for
f32 models); the KV cache f16 (llama.cpp's default) unless told otherwise. Sparse decode (PowerInfer): only
`active_fraction` of a layer's FFN neurons are computed, and all of a computed neuron is read (its rows of up and
gate, its column of down). Predictors (PowerInfer: d -> r, ReLU, r -> d_ff per layer) are dense.
Legend: T tokens in the step, S attended context, D d_model, F d_ff, H heads, r predictor rank.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable

from sparse_lm.roofline.shapes import ModelShape, Precision
from sparse_lm.utils.config import coerce_enums

NORM_WEIGHT_BYTES = 4  # llama.cpp keeps 1-D tensors (norm weights and biases) in f32


class Phase(str, enum.Enum):
    prefill = "prefill"  # T prompt tokens at once, causal attention among them
    decode = "decode"  # one new token attending to S cached tokens

    def __str__(self) -> str:
        return self.value


class Component(str, enum.Enum):
    """Which block an op belongs to: the unit the placement policies move between tiers."""

    attention = "attention"  # q/k/v/o projections, scores, softmax, weighted values
    norm = "norm"  # the norms and residual adds of both blocks
    ffn = "ffn"  # the neuron-wise FFN ops (gate, up, activation, down): what a neuron split divides
    predictor = "predictor"
    head = "head"  # final norm and LM head
    embedding = "embedding"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class Op:
    """One operator's work. Bytes are what the op moves through memory once (no cache reuse assumed)."""

    name: str
    component: Component
    flops: float
    weight_bytes: float
    activation_bytes: float
    kv_bytes: float = 0.0

    def __post_init__(self):
        coerce_enums(self, self.name, {"component": Component})
        for key in ("flops", "weight_bytes", "activation_bytes", "kv_bytes"):
            if getattr(self, key) < 0:
                raise ValueError(f"op {self.name}: {key} must be >= 0, got {getattr(self, key)}")

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.activation_bytes + self.kv_bytes

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOPs per byte (inf for an op that moves no bytes)."""
        return self.flops / self.bytes if self.bytes else float("inf")

    def scaled(self, factor: float) -> Op:
        """The op over a `factor` share of its work (a tier's share of a split FFN)."""
        if not 0 <= factor <= 1:
            raise ValueError(f"op {self.name}: scale factor must be in [0, 1], got {factor}")
        return dataclasses.replace(self, flops=self.flops * factor, weight_bytes=self.weight_bytes * factor,
                                   activation_bytes=self.activation_bytes * factor, kv_bytes=self.kv_bytes * factor)


def _linear(name: str, component: Component, shape: ModelShape, precision: Precision, tokens: int,
            d_in: float, d_out: float) -> Op:
    """tokens x d_in @ d_in x d_out (+ bias). `d_in`/`d_out` may be fractional widths (sparse neuron counts)."""
    act = precision.activation_bytes
    bias_bytes = d_out * NORM_WEIGHT_BYTES if shape.biases else 0.0
    return Op(name, component, flops=2.0 * tokens * d_in * d_out,
              weight_bytes=d_in * d_out * precision.bytes_per_weight + bias_bytes,
              activation_bytes=tokens * (d_in + d_out) * act)


def _elementwise(name: str, component: Component, elements: float, flops_per_element: float, reads: int,
                 act: int, weights: float = 0.0) -> Op:
    """An op reading `reads` tensors of `elements` and writing one."""
    return Op(name, component, flops=elements * flops_per_element, weight_bytes=weights,
              activation_bytes=(reads + 1) * elements * act)


def _norm(name: str, component: Component, shape: ModelShape, precision: Precision, tokens: int) -> Op:
    # LayerNorm (OPT, Falcon) has a bias beside its weight; RMSNorm only the weight. ~5 FLOPs an element
    # (mean, variance or mean square, normalise, scale, shift).
    vectors = 2 if shape.layernorm else 1
    return _elementwise(name, component, tokens * shape.d_model, 5.0, 1, precision.activation_bytes,
                        weights=vectors * shape.d_model * NORM_WEIGHT_BYTES)


def attention_ops(shape: ModelShape, precision: Precision, *, phase: Phase, tokens: int = 1, context: int = 1,
                  kv_element_bytes: int = 2) -> list[Op]:
    """Ops of one layer's attention block (norm, projections, scores, softmax, values, output, residual).

    Args:
      phase: decode attends `tokens` (1) new tokens to `context` cached ones (the new ones included);
        prefill attends `tokens` prompt tokens causally to each other (T (T + 1) / 2 query-key pairs per head).
      kv_element_bytes: bytes of one cached key or value element (2: f16).
    """
    phase = Phase(phase)
    if tokens < 1 or context < 1:
        raise ValueError(f"need tokens >= 1 and context >= 1, got {tokens}, {context}")
    if phase is Phase.decode and context < tokens:
        raise ValueError(f"decode context ({context}) must include the {tokens} new token(s)")
    act, attn = precision.activation_bytes, Component.attention
    h, hd, d = shape.n_heads, shape.head_dim, shape.d_model
    # Query-key pairs per head, and the cache read: decode reads all S cached keys (and values) once; prefill
    # computes them in this step (written once, re-read from on-chip buffers as in fused attention).
    pairs = tokens * context if phase is Phase.decode else tokens * (tokens + 1) / 2
    cache_read = context * shape.kv_dim * kv_element_bytes if phase is Phase.decode else 0.0
    cache_write = tokens * shape.kv_dim * kv_element_bytes
    k_proj = _linear("k_proj", attn, shape, precision, tokens, d, shape.kv_dim)
    v_proj = _linear("v_proj", attn, shape, precision, tokens, d, shape.kv_dim)
    return [
        _norm("attn_norm", Component.norm, shape, precision, tokens),
        _linear("q_proj", attn, shape, precision, tokens, d, shape.q_dim),
        dataclasses.replace(k_proj, kv_bytes=cache_write),
        dataclasses.replace(v_proj, kv_bytes=cache_write),
        Op("qk", attn, flops=2.0 * pairs * h * hd, weight_bytes=0.0,
           activation_bytes=(tokens * shape.q_dim + pairs * h) * act, kv_bytes=cache_read),
        _elementwise("softmax", attn, pairs * h, 5.0, 1, act),
        Op("sv", attn, flops=2.0 * pairs * h * hd, weight_bytes=0.0,
           activation_bytes=(pairs * h + tokens * shape.q_dim) * act, kv_bytes=cache_read),
        _linear("o_proj", attn, shape, precision, tokens, shape.q_dim, d),
        _elementwise("attn_add", Component.norm, tokens * d, 1.0, 2, act),
    ]


def ffn_ops(shape: ModelShape, precision: Precision, *, tokens: int = 1, active_fraction: float = 1.0) -> list[Op]:
    """Ops of one layer's FFN computing `active_fraction` x F neurons (1.0: dense).

    For prefill, pass the fraction of neurons active for any of the T tokens (the union is what is read).
    """
    if not 0 <= active_fraction <= 1:
        raise ValueError(f"active_fraction must be in [0, 1], got {active_fraction}")
    act, ffn = precision.activation_bytes, Component.ffn
    active = active_fraction * shape.d_ff
    ops = [_norm("ffn_norm", Component.norm, shape, precision, tokens)]
    if shape.gated:
        ops.append(_linear("gate", ffn, shape, precision, tokens, shape.d_model, active))
    ops.append(_linear("up", ffn, shape, precision, tokens, shape.d_model, active))
    ops.append(_elementwise("act", ffn, tokens * active, 2.0 if shape.gated else 1.0, 2 if shape.gated else 1, act))
    down = _linear("down", ffn, shape, precision, tokens, active, shape.d_model)
    if shape.biases:  # the output bias is added whatever the active set
        down = dataclasses.replace(down, weight_bytes=active * shape.d_model * precision.bytes_per_weight
                                   + shape.d_model * NORM_WEIGHT_BYTES)
    ops += [down, _elementwise("ffn_add", Component.norm, tokens * shape.d_model, 1.0, 2, act)]
    return [op for op in ops if op.flops or op.bytes]


def predictor_ops(shape: ModelShape, precision: Precision, rank: float, *, tokens: int = 1) -> list[Op]:
    """A PowerInfer predictor: fc1 D -> r, ReLU, fc2 r -> F (its output decides which neurons run)."""
    if rank < 0:
        raise ValueError(f"predictor rank must be >= 0, got {rank}")
    if rank == 0:
        return []
    pred, act = Component.predictor, precision.activation_bytes
    plain = dataclasses.replace(shape, biases=False)  # predictor layers have no biases in PowerInfer's GGUF
    return [
        _linear("pred_fc1", pred, plain, precision, tokens, shape.d_model, rank),
        _elementwise("pred_relu", pred, tokens * rank, 1.0, 1, act),
        _linear("pred_fc2", pred, plain, precision, tokens, rank, shape.d_ff),
    ]


def layer_ops(shape: ModelShape, precision: Precision, *, phase: Phase, tokens: int = 1, context: int = 1,
              active_fraction: float = 1.0, predictor_rank: float = 0.0, kv_element_bytes: int = 2) -> list[Op]:
    """All ops of one decoder layer: attention, predictor (rank 0: none), FFN."""
    return (attention_ops(shape, precision, phase=phase, tokens=tokens, context=context,
                          kv_element_bytes=kv_element_bytes)
            + predictor_ops(shape, precision, predictor_rank, tokens=tokens)
            + ffn_ops(shape, precision, tokens=tokens, active_fraction=active_fraction))


def head_ops(shape: ModelShape, precision: Precision, *, tokens: int = 1) -> list[Op]:
    """Final norm and LM head over the last token only (generation needs the next token's logits alone)."""
    del tokens  # prefill also computes logits of the last position only (llama.cpp without logits_all)
    plain = dataclasses.replace(shape, biases=False)
    return [_norm("final_norm", Component.head, shape, precision, 1),
            _linear("lm_head", Component.head, plain, precision, 1, shape.d_model, shape.vocab_size)]


def embedding_ops(shape: ModelShape, precision: Precision, *, tokens: int = 1) -> list[Op]:
    """Row lookups of the token (and learned position) tables: T rows of each are read."""
    tables = 2 if shape.learned_positions else 1
    return [Op("embedding", Component.embedding, flops=float(tokens * shape.d_model * (tables - 1)),
               weight_bytes=tables * tokens * shape.d_model * precision.bytes_per_weight,
               activation_bytes=tokens * shape.d_model * precision.activation_bytes)]


def total(ops: Iterable[Op]) -> Op:
    """The sum of `ops` as one op (component of the first)."""
    ops = list(ops)
    if not ops:
        return Op("total", Component.attention, 0.0, 0.0, 0.0, 0.0)
    return Op("total", ops[0].component, sum(o.flops for o in ops), sum(o.weight_bytes for o in ops),
              sum(o.activation_bytes for o in ops), sum(o.kv_bytes for o in ops))


def weight_bytes(ops: Iterable[Op], component: Component | None = None) -> float:
    """Weight bytes of `ops` (of one component if given): what the ops need resident on their tier."""
    return sum(o.weight_bytes for o in ops if component is None or o.component is component)


def predictor_rank(shape: ModelShape, predictor_params: float) -> float:
    """Mean per-layer rank r of predictors holding `predictor_params` weights in all: r (D + F) per layer."""
    if predictor_params < 0:
        raise ValueError(f"predictor_params must be >= 0, got {predictor_params}")
    return predictor_params / (shape.n_layers * (shape.d_model + shape.d_ff))
