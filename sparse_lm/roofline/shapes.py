"""Model shapes for the cost model (layers, widths, heads, FFN kind) and weight precisions, with a registry.

Shapes come from the models' published configurations (Hugging Face `config.json` of each checkpoint, and the
papers): OPT (Zhang et al. 2022, Table 1: layers / heads / d_model; d_ff = 4 d_model; vocab 50272; learned
positions; biases), Falcon-40B (tiiuae/falcon-40b: 60 layers, d 8192, 128 query heads of 64 with 8 KV groups,
parallel attention + MLP, d_ff 4 d_model; ReLU-fied by SparseLLM for PowerInfer), LLaMA-2 (Touvron et al. 2023:
7B 32 x 4096 x 11008, 13B 40 x 5120 x 13824, 70B 80 x 8192 x 28672 with 8 KV heads; ReGLU versions by SparseLLM
keep the shapes), Bamboo-7B (Mistral-7B's shape: 32 x 4096 x 14336, 8 KV heads, dReLU), SmolLM2-135M (this
repository's preset). Legend: L layers, D d_model, F d_ff, H query heads, V vocab.
"""

from __future__ import annotations

import dataclasses
import enum

from sparse_lm.models.config import Activation, ModelConfig, NormKind
from sparse_lm.utils.config import coerce_enums


class Precision(str, enum.Enum):
    """Storage format of the weight matrices (norm weights stay f32, activations f16, as in llama.cpp)."""

    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"  # llama.cpp Q8_0: 32 int8 weights + one f16 scale = 34 bytes per 32 weights
    int4 = "int4"  # llama.cpp Q4_0: 32 4-bit weights + one f16 scale = 18 bytes per 32 weights

    def __str__(self) -> str:
        return self.value

    @property
    def bytes_per_weight(self) -> float:
        return {"fp32": 4.0, "fp16": 2.0, "int8": 34 / 32, "int4": 18 / 32}[self.value]

    @property
    def activation_bytes(self) -> int:
        """Bytes of one activation element: f32 models keep f32 activations, the others f16."""
        return 4 if self is Precision.fp32 else 2


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A decoder's shape as the cost model needs it.

    Attributes:
      n_kv_heads: key/value heads (= n_heads for multi-head attention, fewer for grouped-query).
      head_dim: width of one head; None means d_model // n_heads.
      activation: FFN kind; gated kinds (swiglu, reglu, drelu) have gate, up and down matrices, the others
        (relu, relu2: OPT, Falcon) up and down only. A neuron is one row of up (and gate) and one column of down.
      tied_embeddings: the LM head reuses the embedding table (counted once in host memory).
      biases: linear layers carry biases (OPT).
      layernorm: LayerNorm (weight and bias: OPT, Falcon) rather than RMSNorm (weight only: LLaMA).
      learned_positions: rows of a learned position table (OPT: 2048 + 2), 0 for RoPE models.
      parallel_attention: attention and MLP read the same input (Falcon); the bytes and ops do not change.
      source: where the numbers come from.
    """

    name: str
    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    activation: Activation
    head_dim: int | None = None
    tied_embeddings: bool = False
    biases: bool = False
    layernorm: bool = False
    learned_positions: int = 0
    parallel_attention: bool = False
    source: str = ""

    def __post_init__(self):
        coerce_enums(self, self.name or "shape", {"activation": Activation})
        for key in ("n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads", "vocab_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: {key} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.name}: n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads})")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"{self.name}: d_model ({self.d_model}) is not a multiple of n_heads "
                                 f"({self.n_heads}); give head_dim")
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.learned_positions < 0:
            raise ValueError(f"{self.name}: learned_positions must be >= 0, got {self.learned_positions}")

    @property
    def gated(self) -> bool:
        return self.activation.gated

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def attention_params(self) -> int:
        """Weights of one layer's q, k, v and o projections (biases excluded)."""
        return self.d_model * (2 * self.q_dim + 2 * self.kv_dim)

    @property
    def neuron_params(self) -> int:
        """Weights of one FFN neuron: a row of up (and of gate) and a column of down."""
        return (3 if self.gated else 2) * self.d_model

    @property
    def ffn_params(self) -> int:
        return self.d_ff * self.neuron_params

    @property
    def n_params(self) -> int:
        """All matrix and table parameters (norms and biases excluded; the LM head counted once if tied)."""
        tables = (self.vocab_size * (1 if self.tied_embeddings else 2) + self.learned_positions) * self.d_model
        return self.n_layers * (self.attention_params + self.ffn_params) + tables

    @classmethod
    def from_config(cls, config: ModelConfig) -> ModelShape:
        """The shape of one of this repository's model configurations."""
        return cls(
            name=config.name, n_layers=config.n_layers, d_model=config.d_model, d_ff=config.d_ff,
            n_heads=config.n_heads, n_kv_heads=config.n_kv_heads, vocab_size=config.vocab_size,
            activation=config.activation, tied_embeddings=config.tie_embeddings,
            layernorm=config.norm is NormKind.layernorm,
            source=f"sparse_lm.models preset {config.name}",
        )


_OPT = "OPT paper (Zhang et al. 2022) Table 1 and the facebook/opt-* config.json"
_LLAMA2 = "LLaMA-2 paper (Touvron et al. 2023) and meta-llama/Llama-2-*-hf config.json; ReGLU FFN (SparseLLM)"


def _opt(name: str, layers: int, d_model: int, heads: int) -> ModelShape:
    return ModelShape(name, layers, d_model, 4 * d_model, heads, heads, 50272, Activation.relu,
                      tied_embeddings=True, biases=True, layernorm=True, learned_positions=2050, source=_OPT)


SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in (
        _opt("opt_13b", 40, 5120, 40),
        _opt("opt_30b", 48, 7168, 56),
        _opt("opt_66b", 64, 9216, 72),
        _opt("opt_175b", 96, 12288, 96),
        ModelShape("falcon_40b", 60, 8192, 32768, 128, 8, 65024, Activation.relu, parallel_attention=True,
                   layernorm=True,
                   source="tiiuae/falcon-40b config.json (ReLU-fied: SparseLLM/ReluFalcon-40B); 41.8B parameters"),
        ModelShape("llama_reglu_7b", 32, 4096, 11008, 32, 32, 32000, Activation.reglu, source=_LLAMA2),
        ModelShape("llama_reglu_13b", 40, 5120, 13824, 40, 40, 32000, Activation.reglu, source=_LLAMA2),
        ModelShape("llama_reglu_70b", 80, 8192, 28672, 64, 8, 32000, Activation.reglu, source=_LLAMA2),
        ModelShape("bamboo_7b", 32, 4096, 14336, 32, 8, 32000, Activation.drelu,
                   source="Bamboo-7B: Mistral-7B's config.json shape with a dReLU FFN (PowerInfer's release)"),
        ModelShape("llama7b", 32, 4096, 11008, 32, 32, 32000, Activation.swiglu,
                   source="LLaMA-2-7B (dense SwiGLU), the llama7b shape of bench_ffn"),
        ModelShape("smollm2_135m", 30, 576, 1536, 9, 3, 49152, Activation.swiglu, tied_embeddings=True,
                   source="sparse_lm.models.presets.SMOLLM2_135M (HuggingFaceTB/SmolLM2-135M config.json)"),
    )
}


def get_shape(name: str) -> ModelShape:
    """The registered shape called `name`; an unknown name lists the known ones."""
    try:
        return SHAPES[name]
    except KeyError:
        raise KeyError(f"unknown model shape {name!r}; known shapes: {', '.join(sorted(SHAPES))}") from None
