"""Text generation over the KV cache: padded prefill, then a jitted, shape-stable one-token decode step.

The prompt is padded to a bucket length so prompts of similar length share one compiled prefill; the
decode step always sees the same shapes (one token, fixed cache capacity) and donates the cache, so it is
compiled once and updates the cache in place.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from sparse_lm.models.transformer import KVCache, Transformer, init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy decoding; otherwise softmax(logits / temperature) within the top-p nucleus."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")


def sample_token(
    logits: Float[Array, "B V"], rng: jax.Array, temperature: float, top_p: float
) -> Int[Array, " B"]:
    """Greedy for temperature 0; else nucleus sampling over the smallest set with mass >= top_p."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / temperature
    if top_p < 1:
        sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # the smallest logit still inside the nucleus; everything below it is dropped
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)


def prompt_bucket(length: int, minimum: int = 16) -> int:
    """Next power of two >= length (at least `minimum`), so few prefill shapes get compiled."""
    return max(minimum, 1 << max(0, length - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    tokens: list[int]  # generated ids, prompt excluded
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float  # for tokens[1:]; the first comes from the prefill

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.tokens) - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else float("nan")


class Generator:
    """Holds a model's compiled prefill and decode step for a cache capacity and sampling rule."""

    def __init__(self, model: Transformer, *, capacity: int, sampling: SamplingConfig = SamplingConfig()):
        self.config = model.config
        self.capacity = capacity
        self.sampling = sampling
        graphdef, state = nnx.split(model)
        # The state goes to every call as a flat list of arrays: flattening NNX variables on each call cost ~0.6 ms
        # per token in Python (0.0025 ms per variable), on the critical path between tokens.
        self.state, treedef = jax.tree.flatten(state)
        temperature, top_p = sampling.temperature, sampling.top_p

        def merged(leaves):
            return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))

        def prefill(leaves, tokens: Int[Array, "1 P"], length: Int[Array, ""], cache: KVCache, rng):
            logits, cache = merged(leaves)(tokens, cache)
            last = jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False)
            return sample_token(last, rng, temperature, top_p), cache._replace(length=length)

        def decode(leaves, token: Int[Array, " 1"], cache: KVCache, rng):
            """The next token, the cache and the next step's key (split here: on the host it is one more dispatch
            per token)."""
            rng, step_rng = jax.random.split(rng)
            logits, cache = merged(leaves)(token[:, None], cache)
            return sample_token(logits[:, -1], step_rng, temperature, top_p), cache, rng

        self._prefill = jax.jit(prefill, donate_argnums=(3,))
        self._warm_buckets: set[int] = set()
        self._decode = jax.jit(decode, donate_argnums=(2,))

    def _warm_up(self, bucket: int) -> None:
        """Compiles and runs prefill (for this bucket) and decode once, so timings exclude both."""
        if bucket in self._warm_buckets:
            return
        rng = self._committed_key(0)
        tokens = jnp.zeros((1, bucket), jnp.int32)
        token, cache = self._prefill(self.state, tokens, jnp.asarray(1, jnp.int32), self._empty_cache(), rng)
        self.decode_step(token, cache, rng)[0].block_until_ready()
        self._warm_buckets.add(bucket)

    @staticmethod
    def _committed_key(seed: int) -> jax.Array:
        """A key committed to the device, like the keys the decode step returns: a committed and an uncommitted
        argument compile two programs, and the second would compile inside the timed loop."""
        return jax.device_put(jax.random.key(seed), jax.devices()[0])

    def _empty_cache(self) -> KVCache:
        """An empty cache committed to the device, like the caches the steps return (see `_committed_key`)."""
        return jax.device_put(init_cache(self.config, 1, self.capacity), jax.devices()[0])

    def decode_step(self, token: Int[Array, " 1"], cache: KVCache, rng: jax.Array):
        """One token in; the next token, the updated cache and the next key out (the cache argument is donated)."""
        return self._decode(self.state, token, cache, rng)

    def generate(
        self, prompt: list[int], max_new_tokens: int, *, stop_token: int | None = None
    ) -> GenerationResult:
        if not prompt:
            raise ValueError("generation needs a non-empty prompt")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        bucket = prompt_bucket(len(prompt))
        if bucket + max_new_tokens > self.capacity:
            raise ValueError(
                f"prompt bucket {bucket} + max_new_tokens {max_new_tokens} exceeds the cache capacity {self.capacity}"
            )
        padded = np.zeros((1, bucket), np.int32)
        padded[0, : len(prompt)] = prompt
        rng = self._committed_key(self.sampling.seed)
        self._warm_up(bucket)
        cache = self._empty_cache()
        start = time.perf_counter()
        token, cache = self._prefill(self.state, jnp.asarray(padded), jnp.asarray(len(prompt), jnp.int32), cache, rng)
        token.block_until_ready()
        prefill_seconds = time.perf_counter() - start
        out = [int(np.asarray(token)[0])]
        decode_seconds = 0.0
        rng = jax.random.fold_in(rng, 1)  # the prefill used the seed's key itself
        for _ in range(max_new_tokens - 1):
            if stop_token is not None and out[-1] == stop_token:
                break
            start = time.perf_counter()
            token, cache, rng = self.decode_step(token, cache, rng)
            # the host needs each token anyway (stop test, streaming); np.asarray reads it without the gather that
            # indexing the device array would dispatch
            out.append(int(np.asarray(token)[0]))
            decode_seconds += time.perf_counter() - start
        return GenerationResult(out, len(prompt), prefill_seconds, decode_seconds)
