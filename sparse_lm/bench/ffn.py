"""FFN-only benchmark: one token through a dense FFN against the sparse FFN computing only K = fraction x F
neurons, per implementation, measured side by side in one run, with the bandwidth floor beside each.

Every timed call starts from a cold last-level cache (a streamed buffer larger than it is read first: this
machine's L3 holds 480 MB, a 7B-shaped FFN 541 MB), as in decode, where the weights of all layers stream
through once per token. Dense weights are stored [in, out] as the model stores them; the sparse paths read
[F, D] copies (a neuron is a row). Legend: D d_model, F d_ff, K active neurons, L layers.
"""

from __future__ import annotations

import dataclasses
import enum
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from kernels_pallas import cpu, sparse_ffn
from sparse_lm.bench.bandwidth import measure_read_bandwidth
from sparse_lm.models.config import Activation
from sparse_lm.models.ffn import activation_pair
from sparse_lm.results import current_command, write_result
from sparse_lm.utils.config import coerce_enums
from sparse_lm.utils.io import atomic_write_json


class FfnShape(str, enum.Enum):
    smollm2 = "smollm2"  # SmolLM2-135M: d 576, d_ff 1536, 30 layers
    llama7b = "llama7b"  # LLaMA-2-7B: d 4096, d_ff 11008

    def __str__(self) -> str:
        return self.value

    @property
    def dims(self) -> tuple[int, int, int]:
        """(d_model, d_ff, layers timed per call): enough layers that one call streams well past the L3."""
        return {"smollm2": (576, 1536, 30), "llama7b": (4096, 11008, 2)}[self.value]


@dataclasses.dataclass(frozen=True)
class FfnBenchConfig:
    """Schema of `conf/bench_ffn.yaml`. `implementations`: sparse paths timed against dense (xla: gather + dot;
    ffi: the C++ twin; pallas is interpreted on CPU, so it is not a speed path here)."""

    shape: FfnShape = FfnShape.smollm2
    fractions: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5)
    implementations: tuple[str, ...] = ("xla", "ffi")
    activation: Activation = Activation.swiglu  # no exact zeros, so every active row of W_down is read
    rounds: int = 15
    huge_pages: bool = True  # back every weight (dense and sparse copies alike) with 2 MiB pages when Linux can
    flush_bytes: int = 1 << 30
    bandwidth_bytes: int = 1 << 30
    seed: int = 0
    progress: bool = True
    record_as: str | None = None
    results_dir: str = "results"

    def __post_init__(self):
        coerce_enums(self, "", {"shape": FfnShape, "activation": Activation})
        object.__setattr__(self, "fractions", tuple(float(f) for f in self.fractions))
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"fractions must be in (0, 1], got {list(self.fractions)}")
        object.__setattr__(self, "implementations", tuple(str(i) for i in self.implementations))
        for name in self.implementations:
            if name not in ("xla", "ffi", "pallas"):
                raise ValueError(f"implementations: unknown {name!r}; choose from xla, ffi, pallas")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.flush_bytes < 0 or self.bandwidth_bytes < 1 << 20:
            raise ValueError("flush_bytes must be >= 0 and bandwidth_bytes >= 1 MiB")


def dense_ffn_bytes(d_model: int, d_ff: int, gated: bool) -> int:
    return (3 if gated else 2) * d_model * d_ff * 4


def sparse_ffn_bytes(d_model: int, active: int, gated: bool) -> int:
    """Weight rows read plus the index vector."""
    return (3 if gated else 2) * d_model * active * 4 + 4 * active


def make_layers(d_model: int, d_ff: int, n_layers: int, gated: bool, seed: int) -> list[dict[str, jax.Array]]:
    """Random f32 layers (scaled so activations stay O(1)); [F, D] rows for the sparse paths beside the dense
    [in, out] matrices."""
    layers = []
    for layer in range(n_layers):
        keys = jax.random.split(jax.random.key(seed + layer), 3)
        rows = {name: jax.random.normal(key, (d_ff, d_model), jnp.float32) * d_model**-0.5
                for name, key in zip(("gate", "up", "down"), keys, strict=True)}
        if not gated:
            rows.pop("gate")
        dense = {f"{name}_in": rows[name].T.copy() for name in ("gate", "up") if name in rows}
        layers.append({**rows, **dense})
    return layers


def dense_chain(layers, activation: Activation):
    @jax.jit
    def run(x, layers):
        for layer in layers:  # each layer waits for the previous one, as in decode
            gate = x @ layer["gate_in"] if "gate_in" in layer else None
            x = x + 1e-3 * (activation_pair(activation, gate, x @ layer["up_in"]) @ layer["down"])
        return x

    return run


def sparse_chain(layers, activation: Activation, implementation: str):
    @jax.jit
    def run(x, layers, indices):
        for layer, rows in zip(layers, indices, strict=True):
            y = sparse_ffn(x, rows, rows.shape[0], layer.get("gate"), layer["up"], layer["down"], activation,
                           implementation=implementation)
            x = x + 1e-3 * y
        return x

    return run


def run(cfg: FfnBenchConfig, run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", dataclasses.asdict(cfg) | {"shape": cfg.shape.value,
                                                                          "activation": cfg.activation.value})
    d_model, d_ff, n_layers = cfg.shape.dims
    gated = cfg.activation.gated
    if "ffi" in cfg.implementations:
        cpu.register()  # a clear error now, not after the dense setup, if the C++ library is not built
    bandwidth = measure_read_bandwidth(cfg.bandwidth_bytes)
    layers = make_layers(d_model, d_ff, n_layers, gated, cfg.seed)
    huge = cpu.collapse_to_huge_pages(*(w for layer in layers for w in layer.values())) if cfg.huge_pages else 0
    dense_layers = [{k: v for k, v in layer.items() if k in ("gate_in", "up_in", "down")} for layer in layers]
    sparse_layers = [{k: v for k, v in layer.items() if k in ("gate", "up", "down")} for layer in layers]
    rng = np.random.default_rng(cfg.seed)
    actives = {f: max(1, round(f * d_ff)) for f in cfg.fractions}
    indices = {f: [jnp.asarray(np.sort(rng.choice(d_ff, k, replace=False)), jnp.int32) for _ in range(n_layers)]
               for f, k in actives.items()}
    x = jax.random.normal(jax.random.key(cfg.seed + 1000), (1, d_model), jnp.float32)
    flush_buffer = jnp.ones((max(cfg.flush_bytes // 4, 1),), jnp.float32)
    flush = jax.jit(jnp.sum)

    calls = {"dense": (dense_chain(dense_layers, cfg.activation), (x, dense_layers))}
    for impl in cfg.implementations:
        chain = sparse_chain(sparse_layers, cfg.activation, impl)
        for f in cfg.fractions:
            calls[f"{impl}@{f}"] = (chain, (x, sparse_layers, indices[f]))
    reference = calls["dense"][0](*calls["dense"][1])
    for fn, args in calls.values():
        fn(*args).block_until_ready()  # compile
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in tqdm(range(cfg.rounds), desc=f"ffn bench {cfg.shape.value}", unit="round", disable=not cfg.progress):
        for name, (fn, args) in calls.items():  # interleaved: every variant sees the same machine state
            flush(flush_buffer).block_until_ready()
            start = time.perf_counter()
            fn(*args).block_until_ready()
            times[name].append((time.perf_counter() - start) / n_layers)
    del flush_buffer
    assert bool(jnp.all(jnp.isfinite(reference)))

    dense_s = statistics.median(times["dense"])
    dense_bytes = dense_ffn_bytes(d_model, d_ff, gated)
    rows = []
    summary: dict[str, Any] = {
        "shape": cfg.shape.value, "d_model": d_model, "d_ff": d_ff, "activation": cfg.activation.value,
        "layers_per_call": n_layers, "read_bandwidth_gb_per_s": bandwidth / 1e9, "huge_page_bytes": huge,
        "dense_ms": dense_s * 1e3, "dense_bytes": dense_bytes, "dense_floor_ms": dense_bytes / bandwidth * 1e3,
        "dense_gb_per_s": dense_bytes / dense_s / 1e9,
        "floor_speedup": {}, "speedup_vs_dense": {}, "times_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
    }
    for impl in cfg.implementations:
        summary[f"speedup_vs_dense_{impl}"] = {}
    for f in cfg.fractions:
        sparse_bytes = sparse_ffn_bytes(d_model, actives[f], gated)
        summary["floor_speedup"][str(f)] = dense_bytes / sparse_bytes
        row = [f, actives[f], dense_s * 1e3]
        for impl in cfg.implementations:
            seconds = statistics.median(times[f"{impl}@{f}"])
            summary[f"speedup_vs_dense_{impl}"][str(f)] = dense_s / seconds
            row += [seconds * 1e3, dense_s / seconds, sparse_bytes / seconds / 1e9]
        row.append(dense_bytes / sparse_bytes)
        rows.append(row)
    main = "ffi" if "ffi" in cfg.implementations else cfg.implementations[0]
    summary["speedup_vs_dense"] = summary[f"speedup_vs_dense_{main}"]
    summary["speedup_implementation"] = main
    summary["columns"] = ["fraction", "active", "dense_ms"] + [
        c for impl in cfg.implementations for c in (f"{impl}_ms", f"{impl}_speedup", f"{impl}_gb_per_s")
    ] + ["floor_speedup"]
    summary["rows"] = rows
    summary["command"] = current_command()
    atomic_write_json(run_dir / "summary.json", summary)
    if cfg.record_as:
        write_ffn_result(cfg, summary)
    return summary


def write_ffn_result(cfg: FfnBenchConfig, summary: dict[str, Any]) -> Path:
    metrics = {k: summary[k] for k in ("shape", "d_model", "d_ff", "activation", "read_bandwidth_gb_per_s",
                                       "huge_page_bytes", "dense_ms", "dense_floor_ms", "dense_gb_per_s",
                                       "speedup_implementation")}
    for f, value in summary["speedup_vs_dense"].items():
        metrics[f"speedup_vs_dense_{f}"] = value
        metrics[f"floor_speedup_{f}"] = summary["floor_speedup"][f]
    notes = (
        "One token (batch 1, f32, 2 threads) through one FFN layer: median over interleaved rounds, each timed "
        "call starting from a cold cache and passing through "
        f"{summary['layers_per_call']} layers (time per layer shown). `*_speedup`: dense time / sparse time, "
        "measured in the same run. `floor_speedup`: dense weight bytes / sparse weight bytes (plus indices), the "
        "speedup a bandwidth-bound kernel reaches. `*_gb_per_s`: bytes the sparse path must read / its time; "
        "the read bandwidth measured in the same run is the floor's denominator. `huge_page_bytes`: weight bytes "
        "(dense and sparse copies alike) backed by 2 MiB pages (MADV_COLLAPSE)."
    )
    return write_result(
        cfg.record_as, metrics, command=summary["command"],
        title=f"Sparse FFN against dense: {cfg.shape.value} layer (d {summary['d_model']}, d_ff {summary['d_ff']})",
        notes=notes, tables=[{"title": "Time per FFN layer and speedup by active fraction",
                              "columns": summary["columns"], "rows": summary["rows"]}],
        results_dir=cfg.results_dir,
    )
