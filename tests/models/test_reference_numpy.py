"""The real SmolLM2-135M against an independent float64 numpy implementation written here.

The reference reads the GGUF with the `gguf` package only, undoes llama.cpp's Q/K row permutation and
applies RoPE in the Hugging Face half-split form. Our model keeps the permuted rows and rotates
interleaved pairs; agreement of the logits proves both the weights and the RoPE layout.
"""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_lm.models.config import RopeLayout
from sparse_lm.models.gguf_loader import config_from_gguf, load_gguf, open_gguf, smollm2_gguf_path
from tests.helpers import needs_smollm2

PROMPT_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 378, 2240, 28]  # "The capital of France is Paris. The city,"
RELATIVE_TOLERANCE = 1e-4


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's convert permutation (rows of each head: pairs interleaved -> halves)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def reference_logits(path, token_ids: list[int]) -> np.ndarray:
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    t = {x.name: gguf.quants.dequantize(x.data, x.tensor_type).astype(np.float64) for x in reader.tensors}
    n_layers = meta["llama.block_count"]
    n_heads, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    eps, base = meta["llama.attention.layer_norm_rms_epsilon"], meta["llama.rope.freq_base"]
    d_model = meta["llama.embedding_length"]
    head_dim = d_model // n_heads
    length = len(token_ids)

    def rmsnorm(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    inv_freq = base ** (-np.arange(0, head_dim, 2) / head_dim)
    angles = np.arange(length)[:, None] * inv_freq[None, :]  # [L, Dh/2]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]

    def rope_half_split(x):  # x [L, heads, Dh]
        first, second = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)

    x = t["token_embd.weight"][token_ids]  # [L, D]
    causal = np.tril(np.ones((length, length), bool))
    for i in range(n_layers):
        h = rmsnorm(x, t[f"blk.{i}.attn_norm.weight"])
        q = h @ unpermute_qk(t[f"blk.{i}.attn_q.weight"], n_heads).T
        k = h @ unpermute_qk(t[f"blk.{i}.attn_k.weight"], n_kv).T
        v = h @ t[f"blk.{i}.attn_v.weight"].T
        q = rope_half_split(q.reshape(length, n_heads, head_dim))
        k = rope_half_split(k.reshape(length, n_kv, head_dim))
        v = v.reshape(length, n_kv, head_dim)
        out = np.empty_like(q)
        for head in range(n_heads):
            kv_head = head // (n_heads // n_kv)
            scores = q[:, head] @ k[:, kv_head].T / np.sqrt(head_dim)
            scores = np.where(causal, scores, -np.inf)
            probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)
            out[:, head] = probs @ v[:, kv_head]
        x = x + out.reshape(length, d_model) @ t[f"blk.{i}.attn_output.weight"].T
        h = rmsnorm(x, t[f"blk.{i}.ffn_norm.weight"])
        gate = h @ t[f"blk.{i}.ffn_gate.weight"].T
        up = h @ t[f"blk.{i}.ffn_up.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ t[f"blk.{i}.ffn_down.weight"].T
    head = t.get("output.weight", t["token_embd.weight"])
    return rmsnorm(x, t["output_norm.weight"]) @ head.T


@pytest.fixture(scope="module")
def reference():
    return reference_logits(smollm2_gguf_path(), PROMPT_IDS)


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@needs_smollm2
@pytest.mark.real_model
def test_logits_match_float64_reference(smollm2, reference):
    model, _ = smollm2
    logits, _ = model(jnp.asarray([PROMPT_IDS]))
    ours = np.asarray(logits[0], np.float64)
    assert ours.shape == reference.shape == (len(PROMPT_IDS), 49152)
    assert relative_error(ours, reference) < RELATIVE_TOLERANCE
    # the reference's own next-token prediction after "The capital of France is" is " Paris"
    assert int(np.argmax(reference[4])) == int(np.argmax(ours[4])) == 7042


@needs_smollm2
@pytest.mark.real_model
def test_wrong_rope_layout_fails_the_reference(reference):
    """Guard: the half-split form on GGUF (permuted) weights still runs but must not pass."""
    assert config_from_gguf(open_gguf(smollm2_gguf_path())).rope_layout is RopeLayout.interleaved
    wrong, _ = load_gguf()
    for block in wrong.blocks:
        block.attn.rope_layout = RopeLayout.half_split
    logits, _ = wrong(jnp.asarray([PROMPT_IDS]))
    assert relative_error(np.asarray(logits[0], np.float64), reference) > 100 * RELATIVE_TOLERANCE
