"""Training configuration: optimiser, loop, activation regularisation, evaluation, tokenizer, data parallelism."""

from __future__ import annotations

import dataclasses
import enum

from sparse_lm.data import Corpus, DataConfig, Split
from sparse_lm.models.loading import ModelSpec
from sparse_lm.tracking import TrackerConfig
from sparse_lm.utils.config import coerce_enums


def _positive(prefix: str, obj, *fields: str) -> None:
    for field in fields:
        value = getattr(obj, field)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"{prefix}.{field} must be positive, got {value!r}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay to `min_lr_ratio * lr`, and global-norm clipping."""

    lr: float = 1e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0

    def __post_init__(self):
        _positive("optim", self, "lr", "eps")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for field in ("b1", "b2"):
            if not 0 <= getattr(self, field) < 1:
                raise ValueError(f"optim.{field} must be in [0, 1), got {getattr(self, field)}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"optim.clip_norm must be positive or null, got {self.clip_norm}")


class L1Schedule(str, enum.Enum):
    constant = "constant"
    sine = "sine"  # ProSparse: the coefficient rises as sin(pi/2 * t / ramp_steps), then stays


@dataclasses.dataclass(frozen=True)
class ActivationL1Config:
    """L1 penalty on the FFN hidden activations, mean |a| over tokens and neurons, averaged over layers.

    coefficient 0 switches it off (the default).
    """

    coefficient: float = 0.0
    schedule: L1Schedule = L1Schedule.sine
    ramp_steps: int = 100

    def __post_init__(self):
        coerce_enums(self, "l1", {"schedule": L1Schedule})
        if self.coefficient < 0:
            raise ValueError(f"l1.coefficient must be >= 0, got {self.coefficient}")
        _positive("l1", self, "ramp_steps")


class Trainable(str, enum.Enum):
    all = "all"  # every parameter
    ffn = "ffn"  # the FFN matrices only (attention, norms and embeddings frozen: no gradient, no optimiser state)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Attributes:
    steps: optimiser steps; each consumes batch_size rows of seq_len tokens.
    accum_steps: the batch is split into this many micro-batches whose gradients are summed (same update).
    devices: data-parallel devices (the batch is sharded over them; 0 means every visible device).
    log_every, eval_every, checkpoint_every: in steps (the last step is always evaluated and saved).
    keep_checkpoints: how many recent checkpoints to keep.
    nan_at_step: fault injection for tests: the loss of this step is made NaN, as a diverging run's would be.
    """

    steps: int = 100
    batch_size: int = 16
    seq_len: int = 256
    accum_steps: int = 1
    devices: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    progress: bool = True
    nan_at_step: int | None = None
    trainable: Trainable = Trainable.all

    def __post_init__(self):
        coerce_enums(self, "train", {"trainable": Trainable})
        _positive("train", self, "steps", "batch_size", "seq_len", "accum_steps", "log_every", "eval_every",
                  "checkpoint_every", "keep_checkpoints")
        if self.devices < 0:
            raise ValueError(f"train.devices must be >= 0 (0: all visible), got {self.devices}")
        if self.batch_size % self.accum_steps:
            raise ValueError(
                f"train.batch_size={self.batch_size} is not divisible by train.accum_steps={self.accum_steps}"
            )

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


@dataclasses.dataclass(frozen=True)
class TrainEvalConfig:
    """Attributes:
    tokens: validation tokens per corpus scored at each evaluation (whole rows of train.seq_len).
    topk_keep: fractions of FFN neurons kept per token for the forced top-k perplexity (0.1 = 90% sparsity);
      evaluated at the end of the run only.
    """

    tokens: int = 16384
    batch_size: int = 8
    topk_keep: tuple[float, ...] = (0.1,)

    def __post_init__(self):
        _positive("eval", self, "tokens", "batch_size")
        object.__setattr__(self, "topk_keep", tuple(float(k) for k in self.topk_keep))
        if any(not 0 < k <= 1 for k in self.topk_keep):
            raise ValueError(f"eval.topk_keep must be fractions in (0, 1], got {self.topk_keep}")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation from the teacher: the original model of `model` (the same weights before the
    activation swap and thresholds), run on the same tokens inside the training step.

    The objective is ce_weight * CE + kl_weight * T^2 KL(teacher_T || student_T) + ffn_weight * FFN-match, where
    FFN-match is, averaged over layers, the squared error between the student's and the teacher's FFN outputs
    divided by the mean squared teacher output (each layer's FFN fed its own model's residual stream).
    With kl_weight = ffn_weight = 0 (the default) there is no teacher and training is plain next-token loss.
    """

    kl_weight: float = 0.0
    ce_weight: float = 1.0
    temperature: float = 1.0
    ffn_weight: float = 0.0

    def __post_init__(self):
        for field in ("kl_weight", "ce_weight", "ffn_weight"):
            if getattr(self, field) < 0:
                raise ValueError(f"distill.{field} must be >= 0, got {getattr(self, field)}")
        _positive("distill", self, "temperature")
        if self.kl_weight == self.ce_weight == self.ffn_weight == 0:
            raise ValueError("distill.kl_weight, distill.ce_weight and distill.ffn_weight are all 0: nothing to train")

    @property
    def enabled(self) -> bool:
        return self.kl_weight > 0 or self.ffn_weight > 0


@dataclasses.dataclass(frozen=True)
class SwapConfig:
    """How the activation swap of a pretrained model (`model.activation`) is made during training.

    Attributes:
      target_sparsity: when set, per-layer thresholds on the activated gate (`ffn_threshold_on=gate`: FATReLU on
        ReGLU, CATS on SwiGLU) are calibrated before training on `calibration_tokens` training tokens so that this
        share of each layer's gate values is at or below them; they are fixed for the run and saved with the model.
      stages: the layers are swapped in this many groups, bottom group first, one every `stage_steps` steps
        (1: all at once at step 0). Layers not yet swapped keep the original activation and no threshold.
    """

    target_sparsity: float | None = None
    calibration_tokens: int = 16384
    stages: int = 1
    stage_steps: int = 0

    def __post_init__(self):
        if self.target_sparsity is not None and not 0 < self.target_sparsity < 1:
            raise ValueError(f"swap.target_sparsity must be in (0, 1) or null, got {self.target_sparsity}")
        _positive("swap", self, "calibration_tokens", "stages")
        if self.stages > 1 and self.stage_steps <= 0:
            raise ValueError(f"swap.stages={self.stages} needs swap.stage_steps > 0, got {self.stage_steps}")
        if self.stage_steps < 0:
            raise ValueError(f"swap.stage_steps must be >= 0, got {self.stage_steps}")


class TokenizerSource(str, enum.Enum):
    model = "model"  # the model's own tokenizer (GGUF metadata, or bytes for tiny models)
    train_bpe = "train_bpe"  # a byte-level BPE of `vocab_size` trained on the training corpora


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    source: TokenizerSource = TokenizerSource.model
    vocab_size: int = 8192

    def __post_init__(self):
        coerce_enums(self, "tokenizer", {"source": TokenizerSource})
        _positive("tokenizer", self, "vocab_size")


@dataclasses.dataclass(frozen=True)
class TrainRunConfig:
    """Everything `experiments/train.py` composes (schema of `conf/train.yaml`).

    `data` names the first training corpus (its train split) and `extra_corpora` more, mixed by
    concatenating their token streams; validation uses the validation split of each.
    """

    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(split=Split.train))
    extra_corpora: tuple[Corpus, ...] = ()
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    l1: ActivationL1Config = dataclasses.field(default_factory=ActivationL1Config)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    swap: SwapConfig = dataclasses.field(default_factory=SwapConfig)
    eval: TrainEvalConfig = dataclasses.field(default_factory=TrainEvalConfig)
    tracker: TrackerConfig = dataclasses.field(default_factory=TrackerConfig)
    name: str = "train"
    record_as: str | None = None
    results_dir: str = "results"

    def __post_init__(self):
        object.__setattr__(self, "extra_corpora", tuple(Corpus(c) for c in self.extra_corpora))
        if self.data.split is not Split.train and self.data.corpus is not Corpus.textfile:
            raise ValueError(f"data.split must be train for training, got {self.data.split.value}")
        swapping = self.model.activation is not None and self.tokenizer.source is TokenizerSource.model
        if (self.distill.enabled or self.swap.stages > 1 or self.swap.target_sparsity is not None) and not swapping:
            raise ValueError(
                "distill.kl_weight / distill.ffn_weight, swap.stages > 1 and swap.target_sparsity need a model whose "
                "activation is swapped (model.activation set; the original, same weights, is the teacher)"
            )
        if self.swap.target_sparsity is not None and self.model.ffn_thresholds is not None:
            raise ValueError("give either swap.target_sparsity (calibrated) or model.ffn_thresholds, not both")

    def train_corpora(self) -> list[DataConfig]:
        return [self.data] + [self.data.replace(corpus=c, path=None) for c in self.extra_corpora]

    def validation_corpora(self) -> list[DataConfig]:
        if self.data.corpus is Corpus.textfile:
            return [self.data]
        return [c.replace(split=Split.validation) for c in self.train_corpora()]
