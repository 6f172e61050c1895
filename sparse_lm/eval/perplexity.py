"""Perplexity over a token stream with a sliding context window.

Every token after the first is predicted exactly once. A window of `context` tokens starts every `stride`
tokens; it scores only the tokens the previous window did not, so with stride < context each scored token
sees at least context - stride tokens of history. A window starts no later than one token before the
first unscored token, so stride = context means consecutive windows share one token and none is
skipped. A stream shorter than one window is one window.
Windows are padded to a fixed shape so one compiled program serves them all.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int
from tqdm.auto import tqdm


@dataclasses.dataclass(frozen=True)
class Window:
    begin: int  # first input token
    end: int  # one past the last input token
    score_from: int  # first position (absolute) whose prediction counts; >= begin + 1


def plan_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """Windows covering tokens [0, n_tokens) so each of tokens 1..n_tokens-1 is scored once."""
    if context < 2:
        raise ValueError(f"eval.context must be >= 2, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"eval.stride must be in [1, context={context}], got {stride}")
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score, got {n_tokens}")
    windows, scored_until, begin = [], 1, 0  # token 0 is never predicted
    while scored_until < n_tokens:
        end = min(begin + context, n_tokens)
        windows.append(Window(begin, end, scored_until))
        scored_until = end
        # The next window must start before the first unscored token (so it has context to predict it),
        # and the last window is kept full length.
        begin = min(begin + stride, end - 1, n_tokens - context)
    return windows


def token_nll(logits: Float[Array, "B L V"], targets: Int[Array, "B L"]) -> Float[Array, "B L"]:
    """Negative log-likelihood of each target under the logits (float32)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    nll: float  # mean over predicted tokens
    perplexity: float
    n_scored: int
    n_windows: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.n_scored / self.seconds if self.seconds > 0 else float("nan")


def perplexity(
    model: nnx.Module,
    tokens: np.ndarray,
    *,
    context: int,
    stride: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """Mean NLL and perplexity of `tokens` (1-D ids) under `model`, with windows of `context` tokens."""
    tokens = np.asarray(tokens, dtype=np.int32)
    stride = context if stride is None else stride
    windows = plan_windows(len(tokens), context, stride)
    width = min(context, len(tokens)) - 1  # a window of n tokens makes n - 1 predictions
    graphdef, state = nnx.split(model)

    @jax.jit
    def batch_nll(state, inputs: Int[Array, "B L"], targets: Int[Array, "B L"], mask: Bool[Array, "B L"]):
        logits, _ = nnx.merge(graphdef, state)(inputs)
        nll = token_nll(logits, targets)
        return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask)

    total_nll, total_count = 0.0, 0
    start = time.perf_counter()
    bar = tqdm(total=len(windows), desc="perplexity", unit="win", disable=not progress)
    for first in range(0, len(windows), batch_size):
        group = windows[first : first + batch_size]
        inputs = np.zeros((batch_size, width), np.int32)
        targets = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), bool)
        for row, w in enumerate(group):
            n = w.end - w.begin
            inputs[row, : n - 1] = tokens[w.begin : w.end - 1]
            targets[row, : n - 1] = tokens[w.begin + 1 : w.end]
            # target index j predicts absolute position begin + 1 + j
            mask[row, w.score_from - w.begin - 1 : n - 1] = True
        nll_sum, count = batch_nll(state, inputs, targets, mask)
        total_nll += float(nll_sum)
        total_count += int(count)
        bar.update(len(group))
    bar.close()
    seconds = time.perf_counter() - start
    if total_count != len(tokens) - 1:
        raise AssertionError(f"scored {total_count} tokens, expected {len(tokens) - 1}")
    mean = total_nll / total_count
    return PerplexityResult(mean, math.exp(mean), total_count, len(windows), seconds)
