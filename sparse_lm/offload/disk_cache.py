"""The disk tier's storage under a RAM budget: the segmented neuron cache and naive whole-layer loading.

The budget covers the FFN neuron rows only; attention, embeddings, norms, the output head, the int4 predictors and
the KV cache stay in RAM (PowerInfer-2's fixed region). Both tiers live in the C++ part (`disk_tier.cc`); the decode
step reaches them through `disk_decode`, so the two differ only in where rows come from.
- NeuronCache: a hot region (the most often used neurons of a calibration profile, loaded once, never evicted) and
  an LRU region of neuron windows for the rest, split by `lru_fraction`; it also reads ahead neurons guessed for the
  next layer into the LRU region.
- NaiveLayerLoader: LLM-in-a-Flash's baseline: whole layers; the first N that fit in the budget beside one layer
  buffer stay resident, the others are read whole every time they are used. (Which N are pinned does not change the
  bytes read; LRU over layers would pin none, since decode visits layers in a cycle longer than the budget.)
Legend: L layers, F d_ff, D d_model, K capacity, N neurons.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import os
from pathlib import Path

import numpy as np
from jaxtyping import Float, Int

from sparse_lm.offload.disk import ERROR_BYTES, BundleLayout, error_buffer, library, pointer


class HotRanking(str, enum.Enum):
    """What makes a neuron hot in the calibration profile."""

    predicted = "predicted"  # how often the engine asks for it (int4 prediction after the capacity cap): its reads
    fired = "fired"  # how often its activation is not zero

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class DiskTierConfig:
    """Attributes:
    bundle_dir: folder of the bundle file; O_DIRECT needs a disk-backed filesystem (not tmpfs).
    budget_fraction: RAM for FFN rows, as a fraction of the model's FFN weights.
    lru_fraction: share of the budget for the LRU region (the rest is hot); at least one layer's capacity of
      windows is always reserved there, since a layer's misses land in it.
    hot_ranking: the profile statistic ranking neurons for the hot region.
    queue_depth: neuron reads in flight (io_uring).
    layer_chunk_bytes, layer_queue_depth: whole-layer reads (naive loader, hot region load) in chunks of this size,
      this many in flight.
    """

    bundle_dir: str = "runs/disk_tier"
    budget_fraction: float = 0.5
    lru_fraction: float = 0.1
    hot_ranking: HotRanking = HotRanking.predicted
    queue_depth: int = 64
    layer_chunk_bytes: int = 1 << 20
    layer_queue_depth: int = 16

    def __post_init__(self):
        object.__setattr__(self, "hot_ranking", HotRanking(self.hot_ranking))
        if not 0 < self.budget_fraction <= 1:
            raise ValueError(f"disk.budget_fraction must be in (0, 1], got {self.budget_fraction}")
        if not 0 <= self.lru_fraction <= 1:
            raise ValueError(f"disk.lru_fraction must be in [0, 1], got {self.lru_fraction}")
        for key in ("queue_depth", "layer_queue_depth"):
            if not 1 <= getattr(self, key) <= 4096:
                raise ValueError(f"disk.{key} must be in [1, 4096], got {getattr(self, key)}")
        if self.layer_chunk_bytes < 4096 or self.layer_chunk_bytes % 4096:
            raise ValueError(f"disk.layer_chunk_bytes must be a positive multiple of 4096, got "
                             f"{self.layer_chunk_bytes}")
        if not self.bundle_dir:
            raise ValueError("disk.bundle_dir must name a folder")


# ------------------------------------------------------------------------------------------------ budget plans


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """How a budget splits into hot neurons (whole bundles) and LRU windows."""

    budget_bytes: int
    hot_keys: np.ndarray  # int64 layer * F + neuron, ascending
    lru_slots: int
    neuron_bytes: int
    window_bytes: int

    @property
    def hot_bytes(self) -> int:
        return len(self.hot_keys) * self.neuron_bytes

    @property
    def lru_bytes(self) -> int:
        return self.lru_slots * self.window_bytes

    @property
    def resident_bytes(self) -> int:
        return self.hot_bytes + self.lru_bytes


def plan_cache(layout: BundleLayout, align: int, frequency: Int[np.ndarray, "L F"], budget_bytes: int,
               lru_fraction: float, min_lru_slots: int) -> CachePlan:
    """The hottest neurons of `frequency` (ties: lower key first) in whole bundles, and LRU windows: `lru_fraction`
    of the budget but at least `min_lru_slots` (the largest layer capacity), all within `budget_bytes`."""
    frequency = np.asarray(frequency)
    if frequency.shape != (layout.n_layers, layout.d_ff):
        raise ValueError(f"frequency must be [{layout.n_layers}, {layout.d_ff}], got {frequency.shape}")
    window = layout.window_bytes(align)
    lru_slots = max(int(min_lru_slots), int(lru_fraction * budget_bytes) // window)
    hot_budget = budget_bytes - lru_slots * window
    if hot_budget < 0:
        raise ValueError(f"a budget of {budget_bytes} bytes cannot hold the LRU region's minimum of {min_lru_slots} "
                         f"windows ({min_lru_slots * window} bytes, one layer's capacity): raise disk.budget_fraction")
    n_hot = min(frequency.size, hot_budget // layout.neuron_bytes)
    order = np.argsort(-frequency.reshape(-1), kind="stable")
    return CachePlan(int(budget_bytes), np.sort(order[:n_hot]).astype(np.int64), lru_slots, layout.neuron_bytes,
                     window)


def plan_naive(layout: BundleLayout, budget_bytes: int) -> Int[np.ndarray, " L"]:
    """Pinned layers (1) of the naive loader: all if they fit, else the first N fitting beside one layer buffer."""
    stride = layout.layer_stride
    if budget_bytes >= layout.n_layers * stride:
        return np.ones(layout.n_layers, np.uint8)
    if budget_bytes < stride:
        raise ValueError(f"a budget of {budget_bytes} bytes cannot hold one layer ({stride} bytes), which the naive "
                         "loader reads into: raise disk.budget_fraction")
    pinned = np.zeros(layout.n_layers, np.uint8)
    pinned[: (budget_bytes - stride) // stride] = 1
    return pinned


# ------------------------------------------------------------------------------------------------ tiers


@dataclasses.dataclass(frozen=True)
class TierStats:
    """Counters since the last reset: neurons asked for, found resident, read; bytes and reads issued."""

    accesses: int
    hits: int
    misses: int
    bytes_read: int
    reads: int
    resident_bytes: int
    io_uring: bool
    queue_depth: int
    read_seconds: float  # waiting for reads inside decode steps (and loads)
    ffn_seconds: float  # the FFN arithmetic of the resolved rows
    calls: int  # FFI calls (layers x tokens)
    prefetch_reads: int  # neurons read ahead (included in reads and bytes_read)
    prefetch_used: int  # of those, found resident by a later call (counted in its hits)
    registered_buffers: bool  # reads land in io_uring-registered memory (no page pinning per read)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else float("nan")


class DiskTier:
    """A tier object of the C++ part; `handle` is what the decode step's FFI call holds (keep this alive)."""

    def __init__(self, handle: int, layout: BundleLayout, path: Path):
        self._handle = handle
        self.layout = layout
        self.path = path

    @property
    def handle(self) -> int:
        if not self._handle:
            raise ValueError("the disk tier is closed")
        return self._handle

    def stats(self) -> TierStats:
        out = np.zeros(14, np.int64)
        library().dt_stats(self.handle, pointer(out))
        values = [int(v) for v in out]
        return TierStats(*values[:6], bool(values[6]), values[7], values[8] / 1e9, values[9] / 1e9, *values[10:13],
                         bool(values[13]))

    def reset(self) -> None:
        """Zeroes the counters (and empties the cache's LRU region)."""
        library().dt_reset(self.handle)

    def resolve(self, layer: int, neurons: Int[np.ndarray, " N"]) -> Float[np.ndarray, "N R D"]:
        """Makes `neurons` (ascending) of `layer` resident as a decode step does; returns copies of their bundles."""
        neurons = np.ascontiguousarray(neurons, np.int32)
        if not 0 <= layer < self.layout.n_layers or (neurons.size and not (
                0 <= neurons.min() and neurons.max() < self.layout.d_ff and np.all(np.diff(neurons) > 0))):
            raise ValueError(f"neurons must be ascending in [0, {self.layout.d_ff}) and layer in "
                             f"[0, {self.layout.n_layers})")
        addresses, error = np.zeros(len(neurons), np.uint64), error_buffer()
        if library().dt_resolve(self.handle, layer, pointer(neurons), len(neurons), pointer(addresses), error,
                                ERROR_BYTES) != 0:
            raise OSError(error.value.decode())
        shape = (len(self.layout.rows), self.layout.d_model)
        return np.stack([np.ctypeslib.as_array(ctypes.cast(int(a), ctypes.POINTER(ctypes.c_float)), shape).copy()
                         for a in addresses]) if len(neurons) else np.zeros((0, *shape), np.float32)

    def prefetch(self, layer: int, neurons: Int[np.ndarray, " N"]) -> None:
        """Starts reading ahead `neurons` (ascending) of `layer` as a decode step's guess does (cache only)."""
        neurons = np.ascontiguousarray(neurons, np.int32)
        library().dt_prefetch(self.handle, layer, pointer(neurons), len(neurons))

    def close(self) -> None:
        if self._handle:
            library().dt_destroy(self._handle)
            self._handle = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


def _created(handle: int | None, error: ctypes.Array) -> int:
    if not handle:
        raise OSError(error.value.decode())
    return handle


class NeuronCache(DiskTier):
    """The segmented neuron cache of a bundle file under a CachePlan."""

    @classmethod
    def open(cls, path: str | os.PathLike, layout: BundleLayout, align: int, plan: CachePlan,
             cfg: DiskTierConfig) -> NeuronCache:
        error, geometry = error_buffer(), layout.geometry(align)
        handle = library().dt_cache_create(os.fsencode(path), pointer(geometry), cfg.queue_depth,
                                           cfg.layer_chunk_bytes, pointer(plan.hot_keys), len(plan.hot_keys),
                                           plan.lru_slots, error, ERROR_BYTES)
        return cls(_created(handle, error), layout, Path(path))

    def where(self, layer: int, neuron: int) -> str | None:
        """"hot", "lru" or None (not resident)."""
        return {0: None, 1: "hot", 2: "lru"}[library().dt_where(self.handle, layer, neuron)]

    def lru_order(self) -> list[tuple[int, int]]:
        """(layer, neuron) of the LRU region, most recently used first."""
        out = np.zeros(self.stats().resident_bytes // max(self.layout.neuron_bytes, 1) + 1, np.int64)
        n = library().dt_lru_order(self.handle, pointer(out))
        return [(int(k) // self.layout.d_ff, int(k) % self.layout.d_ff) for k in out[:n]]


class NaiveLayerLoader(DiskTier):
    """Whole layers: `pinned` ones resident, the others read on demand into one layer buffer."""

    @classmethod
    def open(cls, path: str | os.PathLike, layout: BundleLayout, align: int, pinned: Int[np.ndarray, " L"],
             cfg: DiskTierConfig) -> NaiveLayerLoader:
        pinned = np.ascontiguousarray(pinned, np.uint8)
        if pinned.shape != (layout.n_layers,):
            raise ValueError(f"pinned must have one entry per layer ({layout.n_layers}), got {pinned.shape}")
        error, geometry = error_buffer(), layout.geometry(align)
        handle = library().dt_naive_create(os.fsencode(path), pointer(geometry), cfg.layer_queue_depth,
                                           cfg.layer_chunk_bytes, pointer(pinned), error, ERROR_BYTES)
        return cls(_created(handle, error), layout, Path(path))

    @property
    def pinned_layers(self) -> int:
        return int(library().dt_pinned_layers(self.handle))
