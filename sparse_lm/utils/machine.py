"""A description of the machine a measurement ran on: hardware and software facts, never its hostname."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

_PACKAGES = ("jax", "jaxlib", "flax", "numpy")
# SIMD extensions that change what XLA and hand-written CPU kernels can do.
_CPU_FEATURES = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "avx512_fp16",
    "amx_bf16",
    "amx_int8",
)


def machine_info() -> dict[str, Any]:
    """Facts that explain a benchmark number: CPU, cores, memory, OS, Python, JAX stack and backend.

    Returns:
      A flat JSON-ready dict. `cores_usable` is the CPU affinity of this process; `cpu_quota_cores` and
      `memory_limit_gib` are the cgroup v2 limits of a container, None when there is none.
    """
    import jax  # lazily: describing the machine should not be the reason jax starts up at import time

    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_features": _cpu_features(),
        "cores_logical": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_quota_cores": _cgroup_cpu_quota(),
        "memory_gib": _memory_gib(),
        "memory_limit_gib": _cgroup_memory_limit_gib(),
        "os": _os_name(),
        "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
    }
    for package in _PACKAGES:
        info[package] = _version(package)
    info["jax_backend"] = jax.default_backend()
    info["jax_devices"] = sorted({device.device_kind for device in jax.devices()})
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One line for a report: 'Intel Xeon, 2/4 cores, 23.5 GiB, Debian 12, Python 3.11.2, jax 0.10.2 (cpu)'.

    Cores read usable/logical when the process may not use them all.
    """
    usable, logical = info.get("cores_usable"), info.get("cores_logical")
    cores = f"{usable}/{logical} cores" if usable != logical else f"{logical} cores"
    if info.get("cpu_quota_cores") is not None:
        cores += f" (quota {info['cpu_quota_cores']:g})"
    memory = f"{info.get('memory_gib')} GiB"
    if info.get("memory_limit_gib") is not None:
        memory += f" (limit {info['memory_limit_gib']} GiB)"
    parts = [
        info.get("cpu_model") or "unknown CPU",
        cores,
        memory,
        info.get("os") or info.get("kernel") or "unknown OS",
        f"Python {info.get('python')}",
        f"jax {info.get('jax')} ({info.get('jax_backend')})",
    ]
    return ", ".join(str(part) for part in parts)


def _cpu_model() -> str | None:
    cpuinfo = _read("/proc/cpuinfo")
    for line in (cpuinfo or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Processor", "cpu model"):
            return " ".join(value.split())
    return platform.processor() or None


def _cpu_features() -> list[str]:
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            return [feature for feature in _CPU_FEATURES if feature in flags]
    return []


def _memory_gib() -> float | None:
    meminfo = _read("/proc/meminfo")
    for line in (meminfo or "").splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) * 1024 / 2**30, 1)
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_cpu_quota() -> float | None:
    quota = (_read("/sys/fs/cgroup/cpu.max") or "").split()
    if len(quota) == 2 and quota[0] != "max":
        return round(int(quota[0]) / int(quota[1]), 2)
    return None


def _cgroup_memory_limit_gib() -> float | None:
    limit = (_read("/sys/fs/cgroup/memory.max") or "").strip()
    if limit.isdigit():
        return round(int(limit) / 2**30, 1)
    return None


def _os_name() -> str | None:
    for line in (_read("/etc/os-release") or "").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.partition("=")[2].strip().strip('"')
    return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None
