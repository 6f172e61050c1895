"""Calibration of this machine's hardware profile: DRAM read bandwidth, CPU f32 matmul FLOP/s, and the disk's
sequential read bandwidth and random 8 KiB read IOPS through O_DIRECT (no page cache). No GPU is measured.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparse_lm.bench.bandwidth import measure_read_bandwidth
from sparse_lm.results import current_command, write_result
from sparse_lm.roofline.hardware import MEASURED, HardwareProfile
from sparse_lm.utils.io import atomic_write_json
from sparse_lm.utils.machine import machine_info

_ALIGN = 4096  # O_DIRECT needs buffers, offsets and sizes aligned to the logical block size (4 KiB covers it)


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """Schema of `conf/calibrate_hardware.yaml`.

    Attributes:
      bandwidth_bytes: array summed to measure the read bandwidth (well above the last-level cache).
      matmul_size: n of the n x n @ n x n f32 matmul timed for FLOP/s.
      disk_dir: folder of the disk test file (None: the run directory); it must be on a disk, not tmpfs.
      disk_file_bytes: size of the test file; disk_block_bytes: sequential read size; random_block_bytes and
        random_reads: the random-read test (queue depth 1).
    """

    bandwidth_bytes: int = 1 << 30
    repeats: int = 5
    matmul_size: int = 2048
    disk_dir: str | None = None
    disk_file_bytes: int = 256 << 20
    disk_block_bytes: int = 4 << 20
    random_block_bytes: int = 8 << 10
    random_reads: int = 2000
    seed: int = 0
    record_as: str | None = None
    results_dir: str = "results"

    def __post_init__(self):
        if self.bandwidth_bytes < 1 << 20 or self.repeats < 1 or self.matmul_size < 64:
            raise ValueError("need bandwidth_bytes >= 1 MiB, repeats >= 1 and matmul_size >= 64")
        for key in ("disk_file_bytes", "disk_block_bytes", "random_block_bytes"):
            value = getattr(self, key)
            if value < _ALIGN or value % _ALIGN:
                raise ValueError(f"{key} must be a positive multiple of {_ALIGN} (O_DIRECT alignment), got {value}")
        if self.disk_block_bytes > self.disk_file_bytes or self.random_block_bytes > self.disk_file_bytes:
            raise ValueError("disk_block_bytes and random_block_bytes must not exceed disk_file_bytes")
        if self.random_reads < 1:
            raise ValueError(f"random_reads must be >= 1, got {self.random_reads}")


def measure_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s (2 n^3 per product) of a jitted f32 n x n matmul on the default CPU backend."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    product = jax.jit(jnp.matmul)
    product(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def _filesystem_type(path: Path) -> str | None:
    """The file system type of the mount holding `path`, from /proc/mounts (longest matching mount point)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    resolved, best, kind = str(path.resolve()), "", None
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3 and (resolved == fields[1] or resolved.startswith(fields[1].rstrip("/") + "/")):
            if len(fields[1]) >= len(best):
                best, kind = fields[1], fields[2]
    return kind


def measure_disk(folder: str | Path, file_bytes: int, block_bytes: int, random_block_bytes: int,
                 random_reads: int, seed: int = 0) -> dict[str, float]:
    """Sequential read bytes/s and random-read IOPS (queue depth 1) of a fresh file in `folder`, via O_DIRECT.

    Raises:
      ValueError: if `folder` is on tmpfs (memory, not a disk) or does not support O_DIRECT.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kind = _filesystem_type(folder)
    if kind in ("tmpfs", "ramfs"):
        raise ValueError(f"disk_dir {folder} is on {kind} (memory): give a folder on a disk")
    path = folder / f".disk_probe_{os.getpid()}.bin"
    buffer = mmap.mmap(-1, max(block_bytes, random_block_bytes))  # page-aligned, as O_DIRECT needs
    try:
        chunk = np.random.default_rng(seed).integers(0, 256, block_bytes, dtype=np.uint8).tobytes()
        with open(path, "wb") as f:  # random bytes: no file system or device can compress them away
            for _ in range(file_bytes // block_bytes):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        size = (file_bytes // block_bytes) * block_bytes
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as exc:
            raise ValueError(f"disk_dir {folder} ({kind}) does not support O_DIRECT: {exc}") from None
        view = memoryview(buffer)
        try:
            start = time.perf_counter()
            for offset in range(0, size, block_bytes):
                os.preadv(fd, [view[:block_bytes]], offset)
            sequential = size / (time.perf_counter() - start)
            blocks = size // random_block_bytes
            offsets = np.random.default_rng(seed + 1).integers(0, blocks, random_reads) * random_block_bytes
            start = time.perf_counter()
            for offset in offsets:
                os.preadv(fd, [view[:random_block_bytes]], int(offset))
            elapsed = time.perf_counter() - start
        finally:
            view.release()  # the mmap cannot close while a view of it is alive
            os.close(fd)
    finally:
        path.unlink(missing_ok=True)  # first: nothing below may leave the probe file behind
        buffer.close()
    return {"disk_bandwidth": sequential, "disk_iops": random_reads / elapsed,
            "disk_random_latency_us": 1e6 * elapsed / random_reads, "disk_filesystem": kind or "unknown"}


def host_memory_bytes(info: dict[str, Any]) -> float:
    """Usable host memory: the container's limit when there is one, else the machine's."""
    gib = info.get("memory_limit_gib") or info.get("memory_gib")
    if not gib:
        raise ValueError("cannot tell this machine's memory size (no /proc/meminfo)")
    return float(gib) * (1 << 30)


def profile_metrics(profile: HardwareProfile) -> dict[str, Any]:
    """The profile as `profile_<field>` metrics: what hardware.load_calibration reads back."""
    return {f"profile_{k}": v for k, v in profile.to_dict().items()}


def run(cfg: CalibrationConfig, run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", dataclasses.asdict(cfg))
    info = machine_info()
    start = time.perf_counter()
    bandwidth = measure_read_bandwidth(cfg.bandwidth_bytes, cfg.repeats)
    flops = measure_matmul_flops(cfg.matmul_size, cfg.repeats)
    disk = measure_disk(cfg.disk_dir or run_dir, cfg.disk_file_bytes, cfg.disk_block_bytes,
                        cfg.random_block_bytes, cfg.random_reads, cfg.seed)
    cores = info.get("cores_usable")
    profile = HardwareProfile(
        name=MEASURED, description=f"this machine: {info.get('cpu_model')}, {cores} usable cores, no GPU",
        cpu_bandwidth=bandwidth, cpu_flops=flops, host_memory_bytes=host_memory_bytes(info),
        disk_bandwidth=disk["disk_bandwidth"], disk_iops=disk["disk_iops"],
        bandwidth_efficiency=1.0, compute_efficiency=1.0,
        source=(f"measured by sparse_lm.roofline.calibrate: read bandwidth = best of {cfg.repeats} jitted sums "
                f"of {cfg.bandwidth_bytes >> 20} MiB; FLOP/s = best of {cfg.repeats} jitted f32 "
                f"{cfg.matmul_size}^2 matmuls; disk = O_DIRECT reads of a {cfg.disk_file_bytes >> 20} MiB file "
                f"({cfg.disk_block_bytes >> 20} MiB sequential, {cfg.random_block_bytes >> 10} KiB random at queue "
                "depth 1); memory from /proc/meminfo or the cgroup limit; no GPU"),
    )
    summary = {
        "read_bandwidth_gb_per_s": bandwidth / 1e9, "matmul_gflops": flops / 1e9,
        "disk_sequential_mb_per_s": disk["disk_bandwidth"] / 1e6, "disk_random_8k_iops": disk["disk_iops"],
        "disk_random_latency_us": disk["disk_random_latency_us"], "disk_filesystem": disk["disk_filesystem"],
        "host_memory_gib": profile.host_memory_bytes / (1 << 30), "cores_usable": cores,
        "calibration_seconds": time.perf_counter() - start, **profile_metrics(profile),
        "command": current_command(),
    }
    atomic_write_json(run_dir / "summary.json", summary)
    atomic_write_json(run_dir / "hardware_profile.json", profile.to_dict())
    if cfg.record_as:
        write_calibration_result(cfg, summary, machine=info)
    return summary


def write_calibration_result(cfg: CalibrationConfig, summary: dict[str, Any],
                             machine: dict[str, Any] | None = None) -> Path:
    metrics = {k: v for k, v in summary.items() if k != "command"}
    notes = (
        "Measured on this machine, by the command above. `profile_*` is the `this_machine` hardware profile "
        "(SI units: bytes/s, FLOP/s, bytes) that `sparse_lm.roofline.get_profile('this_machine')` reads back from "
        "this file; it has no GPU, so only the all_fast policy (everything on the CPU) can be projected on it. "
        "Read bandwidth: a jitted sum over a buffer larger than the last-level cache (both cores). FLOP/s: a "
        "jitted f32 matmul. Disk: O_DIRECT reads (no page cache) of a fresh file of random bytes; random reads are "
        "one at a time (queue depth 1), so IOPS = 1 / latency. Measured efficiencies are 1.0 by definition."
    )
    return write_result(cfg.record_as, metrics, command=summary["command"],
                        title="Hardware calibration: this machine (DRAM, CPU FLOP/s, disk)", notes=notes,
                        results_dir=cfg.results_dir, machine=machine)
