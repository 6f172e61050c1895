"""sparse_lm.roofline.roofline: memory- vs compute-bound time on a tier, LLM-Viewer's form, the op floor."""

import pytest

from sparse_lm.roofline import Component, Op, Tier, analyze


def test_bound_switches_at_the_ridge():
    tier = Tier("t", flops=100.0, bandwidth=10.0)  # ridge: 10 FLOPs per byte
    memory = Op("m", Component.ffn, flops=50.0, weight_bytes=10.0, activation_bytes=0.0)  # intensity 5
    compute = Op("c", Component.ffn, flops=200.0, weight_bytes=10.0, activation_bytes=0.0)  # intensity 20
    assert tier.ridge == 10.0
    assert (tier.bound(memory), tier.time(memory)) == ("memory", 1.0)
    assert (tier.bound(compute), tier.time(compute)) == ("compute", 2.0)
    for op in (memory, compute):  # LLM-Viewer: ops / min(intensity x bandwidth, peak)
        assert tier.time(op) == pytest.approx(op.flops / min(op.intensity * tier.bandwidth, tier.flops))


def test_floor_and_empty_op():
    tier = Tier("t", flops=100.0, bandwidth=10.0, op_floor_s=3.0)
    tiny = Op("tiny", Component.ffn, flops=1.0, weight_bytes=1.0, activation_bytes=0.0)
    assert tier.time(tiny) == 3.0
    assert tier.time(tiny.scaled(0.0)) == 0.0  # no work, no launch
    rows = analyze([tiny], tier)
    assert rows[0]["bound"] == "memory" and rows[0]["seconds"] == 3.0


def test_bad_tier():
    with pytest.raises(ValueError, match="tier x"):
        Tier("x", flops=0.0, bandwidth=1.0)
