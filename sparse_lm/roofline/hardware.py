"""Hardware profiles for the cost model: GPU, PCIe, host CPU and DRAM, disk; a registry of named machines.

Every number is stored as its source gives it (a vendor sheet's peak, a paper's figure, or a measurement here) in
SI units (bytes/s, FLOP/s, bytes). What a program achieves is `bandwidth_efficiency` x peak for every bandwidth
and `compute_efficiency` x peak for every FLOP rate: one assumption for all vendor-sheet profiles (0.8 and 0.7,
see VENDOR_EFFICIENCY), 1.0 for measured ones (a measurement is already what a program achieves).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

GIB = 1 << 30
GB = 1e9
TFLOPS = 1e12

# Achievable share of a vendor peak. Bandwidth: streaming reads reach ~80% of the theoretical DRAM, GDDR/HBM
# and PCIe rates (STREAM on desktop DDR4/DDR5; PCIe 4.0 x16 copies ~25 of 32 GB/s, 3.0 x16 ~12.5 of 16).
# Compute: sustained large GEMMs reach ~70% of the tensor-core or FMA peak. Assumptions, not fitted to any result.
VENDOR_EFFICIENCY = {"bandwidth": 0.8, "compute": 0.7}

DEFAULT_CALIBRATION = "results/hardware_this_machine.json"


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
    """One machine. GPU and PCIe fields are None for a machine without a GPU; disk fields None when unknown.

    Attributes:
      gpu_bandwidth: GPU memory bandwidth, bytes/s.
      gpu_flops: dense FP16 tensor FLOP/s (weight-only int4/int8 is dequantised and multiplied in FP16).
      gpu_memory_bytes: GPU memory.
      pcie_bandwidth: host <-> GPU link, bytes/s per direction.
      cpu_bandwidth: host DRAM read bandwidth, bytes/s.
      cpu_flops: FP32 FLOP/s of the cores the engine runs on.
      host_memory_bytes: host DRAM.
      disk_bandwidth: sequential read, bytes/s; disk_iops: random 8 KiB reads/s at queue depth 1.
      bandwidth_efficiency, compute_efficiency: achievable share of the peaks above.
      source: where each number comes from.
    """

    name: str
    cpu_bandwidth: float
    cpu_flops: float
    host_memory_bytes: float
    gpu_bandwidth: float | None = None
    gpu_flops: float | None = None
    gpu_memory_bytes: float | None = None
    pcie_bandwidth: float | None = None
    disk_bandwidth: float | None = None
    disk_iops: float | None = None
    bandwidth_efficiency: float = VENDOR_EFFICIENCY["bandwidth"]
    compute_efficiency: float = VENDOR_EFFICIENCY["compute"]
    description: str = ""
    source: str = ""

    def __post_init__(self):
        for key in ("cpu_bandwidth", "cpu_flops", "host_memory_bytes", "gpu_bandwidth", "gpu_flops",
                    "gpu_memory_bytes", "pcie_bandwidth", "disk_bandwidth", "disk_iops"):
            value = getattr(self, key)
            if value is None and key in ("cpu_bandwidth", "cpu_flops", "host_memory_bytes"):
                raise ValueError(f"hardware {self.name!r}: {key} is required")
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not math.isfinite(value) or value <= 0):
                raise ValueError(f"hardware {self.name!r}: {key} must be a positive number or None, got {value!r}")
        gpu = [getattr(self, k) is None for k in ("gpu_bandwidth", "gpu_flops", "gpu_memory_bytes", "pcie_bandwidth")]
        if any(gpu) and not all(gpu):
            raise ValueError(f"hardware {self.name!r}: give all of gpu_bandwidth, gpu_flops, gpu_memory_bytes and "
                             "pcie_bandwidth, or none of them (no GPU)")
        for key in ("bandwidth_efficiency", "compute_efficiency"):
            if not 0 < getattr(self, key) <= 1:
                raise ValueError(f"hardware {self.name!r}: {key} must be in (0, 1], got {getattr(self, key)}")

    @property
    def has_gpu(self) -> bool:
        return self.gpu_bandwidth is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HardwareProfile:
        """A profile from `to_dict` output; an unknown key is an error naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"hardware profile: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)


PROFILES: dict[str, HardwareProfile] = {
    p.name: p
    for p in (
        HardwareProfile(
            name="pc_high", description="PowerInfer PC-High: RTX 4090 24 GB, i9-13900K, 192 GB DDR5, PCIe 4.0 x16",
            gpu_bandwidth=1008 * GB, gpu_flops=165.2 * TFLOPS, gpu_memory_bytes=24 * GIB, pcie_bandwidth=32 * GB,
            cpu_bandwidth=67.2 * GB, cpu_flops=8 * 32 * 5.0e9, host_memory_bytes=192 * GIB,
            source=("GPU: NVIDIA RTX 4090 sheet (1008 GB/s; 165.2 TFLOPS dense FP16 tensor), 24 GiB; PCIe 4.0 x16 "
                    "32 GB/s per direction (spec); DRAM 67.2 GB/s and 192 GB: PowerInfer paper; CPU FLOP/s derived: "
                    "8 P-cores (PowerInfer runs on the P-cores) x 32 FP32 FLOP/cycle (2 x 256-bit FMA) x 5.0 GHz "
                    "all-core P turbo (Intel ARK, assumed); disk: not given"),
        ),
        HardwareProfile(
            name="pc_low", description="PowerInfer PC-Low: RTX 2080Ti 11 GB, i7-12700K, 64 GB, PCIe 3.0 x16",
            gpu_bandwidth=616 * GB, gpu_flops=107.6 * TFLOPS, gpu_memory_bytes=11 * GIB, pcie_bandwidth=16 * GB,
            cpu_bandwidth=38.4 * GB, cpu_flops=8 * 32 * 4.7e9, host_memory_bytes=64 * GIB,
            source=("GPU: NVIDIA RTX 2080 Ti sheet / Turing whitepaper (616 GB/s; 107.6 TFLOPS FP16 tensor at "
                    "reference boost), 11 GiB; PCIe 3.0 x16 16 GB/s per direction (spec); DRAM 38.4 GB/s and 64 GB: "
                    "PowerInfer paper; CPU FLOP/s derived: 8 P-cores x 32 FP32 FLOP/cycle x 4.7 GHz all-core P "
                    "turbo (Intel ARK, assumed); disk: not given"),
        ),
        HardwareProfile(
            name="a100", description="NVIDIA A100-80G SXM (LLM-Viewer's profile) in a typical EPYC server",
            gpu_bandwidth=2039 * GB, gpu_flops=312 * TFLOPS, gpu_memory_bytes=80 * GIB, pcie_bandwidth=32 * GB,
            cpu_bandwidth=204.8 * GB, cpu_flops=64 * 32 * 2.45e9, host_memory_bytes=1024 * GIB,
            source=("GPU: LLM-Viewer hardware table (2039 GB/s, 312 TFLOPS FP16), 80 GiB; host link PCIe 4.0 x16; "
                    "host assumed (not in LLM-Viewer): one AMD EPYC 7763 socket, 8 channels DDR4-3200 = 204.8 GB/s, "
                    "64 cores x 32 FLOP/cycle x 2.45 GHz, 1 TiB"),
        ),
        HardwareProfile(
            name="h100", description="NVIDIA H100 SXM (LLM-Viewer's profile) in a typical Xeon server",
            gpu_bandwidth=3072 * GB, gpu_flops=989 * TFLOPS, gpu_memory_bytes=80 * GIB, pcie_bandwidth=64 * GB,
            cpu_bandwidth=307.2 * GB, cpu_flops=56 * 64 * 2.0e9, host_memory_bytes=2048 * GIB,
            source=("GPU: LLM-Viewer hardware table (3072 GB/s, 989 TFLOPS dense FP16; NVIDIA's sheet says 3.35 "
                    "TB/s), 80 GiB; host link PCIe 5.0 x16 64 GB/s; host assumed: one Xeon 8480+ socket, 8 channels "
                    "DDR5-4800 = 307.2 GB/s, 56 cores x 64 FLOP/cycle (AVX-512) x 2.0 GHz, 2 TiB"),
        ),
    )
}

MEASURED = "this_machine"  # the profile built from a calibration file (sparse_lm.roofline.calibrate)


def known_profiles() -> list[str]:
    return sorted([*PROFILES, MEASURED])


def get_profile(name: str, calibration: str | Path | None = None) -> HardwareProfile:
    """The profile called `name`; `this_machine` is read from `calibration` (default DEFAULT_CALIBRATION).

    Raises:
      KeyError naming the unknown profile and the known ones; FileNotFoundError when this_machine has no
      calibration file yet (with the command that writes it).
    """
    if name == MEASURED:
        return load_calibration(calibration or DEFAULT_CALIBRATION)
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown hardware profile {name!r}; known profiles: {', '.join(known_profiles())}") from None


def load_calibration(path: str | Path) -> HardwareProfile:
    """The profile stored in a calibration result (its `profile_*` metrics, see calibrate.profile_metrics)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no calibration file {path}; write it with "
                                "`python experiments/calibrate_hardware.py`")
    try:
        metrics = json.loads(path.read_text())["metrics"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a calibration result ({exc})") from None
    fields = {k.removeprefix("profile_"): v for k, v in metrics.items() if k.startswith("profile_")}
    if not fields:
        raise ValueError(f"{path}: has no profile_* metrics; rerun experiments/calibrate_hardware.py")
    return HardwareProfile.from_dict(fields)


@dataclasses.dataclass(frozen=True)
class HardwareSpec:
    """Schema of `conf/hardware/*.yaml`: a profile name from the registry (the YAML holds no numbers, so the
    registry stays the one source of truth) and, for `this_machine`, the calibration file."""

    name: str = "pc_high"
    calibration: str | None = None

    def __post_init__(self):
        if self.name not in known_profiles():
            raise ValueError(f"hardware.name={self.name!r} is not one of: {', '.join(known_profiles())}")
        if self.calibration is not None and self.name != MEASURED:
            raise ValueError(f"hardware.calibration is only read for {MEASURED}, not {self.name!r}")

    def resolve(self) -> HardwareProfile:
        return get_profile(self.name, self.calibration)
