"""Capturing named FFN values (see `CapturePoint`) from every layer during a forward pass.

Capture is off by default. `set_capture` switches points on for every FFN; `capture_forward` runs the
blocks under `nnx.capture` and returns each point's value per layer. Jitted callers get the values as
traced arrays and reduce them in the same program, so nothing per token leaves the device.
"""

from __future__ import annotations

from collections.abc import Iterable

from flax import nnx
from jaxtyping import Array, Float, Int

from sparse_lm.models.ffn import CapturePoint
from sparse_lm.models.transformer import Transformer


def set_capture(model: Transformer, points: Iterable[CapturePoint | str]) -> None:
    """Captures `points` in every FFN of `model` from now on (an empty iterable switches capture off)."""
    chosen = frozenset(CapturePoint(p) for p in points)
    if CapturePoint.ffn_gate in chosen and not model.config.activation.gated:
        raise ValueError(
            f"capture point ffn_gate needs a gated FFN; model {model.config.name} uses "
            f"{model.config.activation.value}"
        )
    for block in model.blocks:
        block.ffn.capture_points = chosen


def split_capturing(model: Transformer, points: Iterable[CapturePoint | str]) -> tuple[nnx.GraphDef, nnx.State]:
    """`nnx.split` of `model` with `points` captured in the split graph only; the model itself keeps capturing
    nothing, so its plain forward pass is not slowed."""
    set_capture(model, points)
    try:
        return nnx.split(model)
    finally:
        set_capture(model, [])


def capture_forward(
    model: Transformer, tokens: Int[Array, "B L"]
) -> tuple[Float[Array, "B L D"], dict[CapturePoint, list[Array]]]:
    """Runs the blocks (no output head) and returns the final hidden state and, per captured point, a list
    with one array per layer."""
    points = model.blocks[0].ffn.capture_points if len(model.blocks) else frozenset()
    if not points:
        raise ValueError("no capture point is set: call set_capture(model, points) first")
    (hidden, _), intermediates = nnx.capture(lambda m, t: m.forward_blocks(t), nnx.Intermediate)(model, tokens)
    captured: dict[CapturePoint, list[Array]] = {p: [] for p in points}
    for layer in range(len(model.blocks)):
        ffn_state = intermediates["blocks"][layer]["ffn"]
        for point in points:
            (value,) = ffn_state[point.value].get_value()
            captured[point].append(value)
    return hidden, captured
