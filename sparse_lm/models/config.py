"""Model configuration: a frozen, self-validating dataclass for decoder-only LLaMA-family models."""

from __future__ import annotations

import dataclasses
import enum

from sparse_lm.utils.config import coerce_enums


class Activation(str, enum.Enum):
    """FFN activation pair: how the hidden activation a is formed from the gate and up projections.

    Member names are lower case because OmegaConf validates enums by name (`activation: drelu`).
    """

    swiglu = "swiglu"  # silu(gate) * up
    reglu = "reglu"  # relu(gate) * up (ReLU-fied SwiGLU)
    drelu = "drelu"  # relu(gate) * relu(up) (TurboSparse)
    relu = "relu"  # relu(up), no gate (OPT style)
    relu2 = "relu2"  # relu(up) ** 2, no gate

    def __str__(self) -> str:  # run directories and interpolations read `drelu`, not `Activation.drelu`
        return self.value

    @property
    def gated(self) -> bool:
        return self in (Activation.swiglu, Activation.reglu, Activation.drelu)


class ThresholdTarget(str, enum.Enum):
    """What an FFN threshold t is compared with (see `ModelConfig.ffn_thresholds`)."""

    hidden = "hidden"  # |a| > t, a the hidden activation (TEAL)
    gate = "gate"  # |sigma(gate)| > t (CATS on SwiGLU, FATReLU on ReGLU): the gate row alone decides

    def __str__(self) -> str:
        return self.value


class NormKind(str, enum.Enum):
    rmsnorm = "rmsnorm"
    layernorm = "layernorm"


class RopeLayout(str, enum.Enum):
    """Which feature pairs RoPE rotates together.

    interleaved rotates (2i, 2i+1): the layout of GGUF files, whose converter permutes Q/K rows.
    half_split rotates (i, i + head_dim/2): the Hugging Face LLaMA layout.
    """

    interleaved = "interleaved"
    half_split = "half_split"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    Attributes:
      ffn_thresholds: optional activation threshold t per layer (one value applies to every layer).
        The FFN then keeps a hidden activation a only where |a| > t (TEAL-style magnitude sparsity;
        with a ReLU-family activation and t > 0 this is FATReLU's shifted threshold on the output), or,
        with `ffn_threshold_on=gate`, only where the activated gate |sigma(gate)| > t.
      ffn_threshold_on: `hidden` or `gate` (gated FFNs only).
    """

    name: str = "custom"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 0  # 0 means d_model // n_heads
    d_ff: int = 128
    activation: Activation = Activation.swiglu
    norm: NormKind = NormKind.rmsnorm
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_layout: RopeLayout = RopeLayout.half_split
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    ffn_thresholds: tuple[float, ...] | None = None
    ffn_threshold_on: ThresholdTarget = ThresholdTarget.hidden
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        coerce_enums(
            self, "model",
            {"activation": Activation, "norm": NormKind, "rope_layout": RopeLayout,
             "ffn_threshold_on": ThresholdTarget},
        )
        if self.ffn_thresholds is not None:
            object.__setattr__(self, "ffn_thresholds", tuple(float(t) for t in self.ffn_thresholds))
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            if int(getattr(self, field)) <= 0:
                raise ValueError(f"model.{field} must be positive, got {getattr(self, field)}")
        if self.head_dim < 0:
            raise ValueError(f"model.head_dim must be >= 0 (0 derives it), got {self.head_dim}")
        if self.head_dim == 0 and self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; set model.head_dim"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}"
            )
        if self.resolved_head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {self.resolved_head_dim}")
        if self.norm_eps <= 0:
            raise ValueError(f"model.norm_eps must be positive, got {self.norm_eps}")
        if self.rope_base <= 1:
            raise ValueError(f"model.rope_base must be > 1, got {self.rope_base}")
        if self.ffn_thresholds is not None:
            if len(self.ffn_thresholds) not in (1, self.n_layers):
                raise ValueError(
                    f"model.ffn_thresholds has {len(self.ffn_thresholds)} values; give 1 or n_layers={self.n_layers}"
                )
            if any(t < 0 for t in self.ffn_thresholds):
                raise ValueError(f"model.ffn_thresholds must be >= 0, got {self.ffn_thresholds}")
        if self.ffn_threshold_on is ThresholdTarget.gate and not self.activation.gated:
            raise ValueError(f"model.ffn_threshold_on=gate needs a gated FFN, not {self.activation.value}")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def layer_threshold(self, layer: int) -> float | None:
        if self.ffn_thresholds is None:
            return None
        return self.ffn_thresholds[0] if len(self.ffn_thresholds) == 1 else self.ffn_thresholds[layer]

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def param_count(self) -> int:
        """Parameters implied by the shapes alone (checked against the built model in tests)."""
        d, f, hd = self.d_model, self.d_ff, self.resolved_head_dim
        attn = d * hd * self.n_heads * 2 + d * hd * self.n_kv_heads * 2
        ffn = (3 if self.activation.gated else 2) * d * f
        norm = d if self.norm is NormKind.rmsnorm else 2 * d
        per_layer = attn + ffn + 2 * norm
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return embed + self.n_layers * per_layer + norm
