"""Capture points: off by default, zero cost when off, and the captured values are the FFN's own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm.models.capture import capture_forward, set_capture
from sparse_lm.models.config import Activation
from sparse_lm.models.ffn import CapturePoint
from sparse_lm.models.presets import TINY
from sparse_lm.models.transformer import Transformer

TOKENS = jnp.array([[3, 1, 4, 1, 5, 9, 2, 6]])


def plain_hlo(model) -> str:
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0]).lower(state, TOKENS).as_text()


def test_capture_is_off_by_default_and_leaves_the_plain_forward_unchanged():
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    assert all(block.ffn.capture_points == frozenset() for block in model.blocks)
    before = plain_hlo(model)
    set_capture(model, list(CapturePoint))
    graphdef, state = nnx.split(model)
    captured_hlo = (
        jax.jit(lambda s, t: capture_forward(nnx.merge(graphdef, s), t)[1]).lower(state, TOKENS).as_text()
    )
    assert captured_hlo != before  # switched on, the captured program differs ...
    set_capture(model, [])
    assert plain_hlo(model) == before  # ... and switched off the plain forward is the same program again


def test_captured_values_are_the_ffn_input_gate_and_hidden():
    model = Transformer(TINY.replace(activation=Activation.reglu), rngs=nnx.Rngs(1))
    set_capture(model, list(CapturePoint))
    hidden_out, captured = capture_forward(model, TOKENS)
    assert set(captured) == set(CapturePoint)
    assert all(len(values) == TINY.n_layers for values in captured.values())
    # recompute layer 1's FFN from its captured input
    ffn = model.blocks[1].ffn
    x = captured[CapturePoint.ffn_input][1]
    gate = x @ ffn.w_gate[...]
    np.testing.assert_allclose(captured[CapturePoint.ffn_gate][1], gate, rtol=1e-6)
    np.testing.assert_allclose(
        captured[CapturePoint.ffn_hidden][1], jax.nn.relu(gate) * (x @ ffn.w_up[...]), rtol=1e-5, atol=1e-6
    )
    assert captured[CapturePoint.ffn_hidden][0].shape == (1, 8, TINY.d_ff)
    # capture does not change the computation
    set_capture(model, [])
    plain, _ = model.forward_blocks(TOKENS)
    np.testing.assert_allclose(hidden_out, plain, rtol=1e-6)


def test_capture_errors():
    model = Transformer(TINY.replace(activation=Activation.relu), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="ffn_gate needs a gated FFN"):
        set_capture(model, [CapturePoint.ffn_gate])
    with pytest.raises(ValueError, match="no capture point"):
        capture_forward(model, TOKENS)
    with pytest.raises(ValueError):
        set_capture(model, ["ffn_outputs"])


def test_ffn_output_is_what_the_block_adds_to_the_residual():
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    set_capture(model, [CapturePoint.ffn_input, CapturePoint.ffn_output])
    _, captured = capture_forward(model, TOKENS)
    for block, x, y in zip(model.blocks, captured[CapturePoint.ffn_input], captured[CapturePoint.ffn_output],
                           strict=True):
        expected = (jax.nn.silu(x @ block.ffn.w_gate[...]) * (x @ block.ffn.w_up[...])) @ block.ffn.w_down[...]
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
