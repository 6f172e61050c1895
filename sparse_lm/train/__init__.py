"""Training: optax loops (from scratch, ReLU-fication), orbax checkpoints, data parallelism."""

from sparse_lm.train.config import (
    ActivationL1Config,
    L1Schedule,
    OptimizerConfig,
    TokenizerConfig,
    TokenizerSource,
    TrainConfig,
    TrainEvalConfig,
    TrainRunConfig,
)

__all__ = [
    "ActivationL1Config",
    "L1Schedule",
    "OptimizerConfig",
    "TokenizerConfig",
    "TokenizerSource",
    "TrainConfig",
    "TrainEvalConfig",
    "TrainRunConfig",
]
