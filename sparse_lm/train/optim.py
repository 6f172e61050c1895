"""Optimiser and schedules: AdamW with warmup + cosine, clipping, and the L1 coefficient schedule."""

from __future__ import annotations

import math

import jax
import optax

from sparse_lm.train.config import ActivationL1Config, L1Schedule, OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay to min_lr_ratio * lr at total_steps."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Clipping (if set) then AdamW; weight decay skips vectors (norm scales)."""
    adamw = optax.adamw(
        learning_rate_schedule(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
    )
    if cfg.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)


def l1_coefficient(cfg: ActivationL1Config, step: int) -> float:
    """The L1 coefficient at `step` (0-based)."""
    if cfg.coefficient == 0:
        return 0.0
    if cfg.schedule is L1Schedule.constant:
        return cfg.coefficient
    progress = min((step + 1) / cfg.ramp_steps, 1.0)
    return cfg.coefficient * math.sin(math.pi / 2 * progress)
