"""The roofline of one op on one tier (LLM-Viewer's method): time = FLOPs / min(intensity x bandwidth, peak).

That is max(FLOPs / peak, bytes / bandwidth): an op is memory bound when its arithmetic intensity is below the
tier's ridge point peak / bandwidth, compute bound above it. A tier may also have a floor per op (a kernel
launch, a thread-pool barrier): no op is faster than it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from sparse_lm.roofline.hardware import HardwareProfile
from sparse_lm.roofline.ops import Op


@dataclasses.dataclass(frozen=True)
class Tier:
    """One compute tier as the roofline sees it: achievable FLOP/s and bytes/s, and the least time of an op."""

    name: str
    flops: float
    bandwidth: float
    op_floor_s: float = 0.0

    def __post_init__(self):
        if not (self.flops > 0 and self.bandwidth > 0 and self.op_floor_s >= 0):
            raise ValueError(f"tier {self.name}: need flops > 0, bandwidth > 0, op_floor_s >= 0; got "
                             f"{self.flops}, {self.bandwidth}, {self.op_floor_s}")

    @property
    def ridge(self) -> float:
        """FLOPs per byte above which an op is compute bound."""
        return self.flops / self.bandwidth

    def bound(self, op: Op) -> str:
        return "compute" if op.intensity > self.ridge else "memory"

    def time(self, op: Op) -> float:
        """Seconds for `op` on this tier (0 for an op with no work, e.g. an empty share of a split FFN)."""
        if not (op.flops or op.bytes):
            return 0.0
        return max(op.flops / self.flops, op.bytes / self.bandwidth, self.op_floor_s)

    def total_time(self, ops: Iterable[Op]) -> float:
        return sum(self.time(op) for op in ops)


def gpu_tier(hardware: HardwareProfile, op_floor_s: float = 0.0) -> Tier:
    if not hardware.has_gpu:
        raise ValueError(f"hardware {hardware.name!r} has no GPU")
    return Tier("gpu", hardware.gpu_flops * hardware.compute_efficiency,
                hardware.gpu_bandwidth * hardware.bandwidth_efficiency, op_floor_s)


def cpu_tier(hardware: HardwareProfile, op_floor_s: float = 0.0) -> Tier:
    return Tier("cpu", hardware.cpu_flops * hardware.compute_efficiency,
                hardware.cpu_bandwidth * hardware.bandwidth_efficiency, op_floor_s)


def pcie_bandwidth(hardware: HardwareProfile) -> float:
    """Achievable host <-> GPU bytes/s."""
    if not hardware.has_gpu:
        raise ValueError(f"hardware {hardware.name!r} has no GPU, hence no PCIe link to one")
    return hardware.pcie_bandwidth * hardware.bandwidth_efficiency


def analyze(ops: Iterable[Op], tier: Tier) -> list[dict[str, Any]]:
    """LLM-Viewer's table: per op its FLOPs, bytes, intensity, bound and time on `tier`."""
    return [{"op": op.name, "component": op.component.value, "flops": op.flops, "weight_bytes": op.weight_bytes,
             "activation_bytes": op.activation_bytes, "kv_bytes": op.kv_bytes, "intensity": op.intensity,
             "bound": tier.bound(op), "seconds": tier.time(op)} for op in ops]
