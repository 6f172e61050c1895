"""Dense batch-1 decode speed of a model against the memory-bandwidth floor, measured in one run.

Every decoded token reads all weights once (the tied embedding as the output head; the lookup row is
negligible), so tokens/s can be no higher than bandwidth / weight bytes. Bandwidth is measured before and
after the decode runs, in the same process, and the best of the two is the floor's denominator.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_lm.bench import llama_cpp
from sparse_lm.bench.bandwidth import measure_read_bandwidth
from sparse_lm.bench.sparse_decode import compare
from sparse_lm.data import DataConfig
from sparse_lm.eval.generate import Generator, prompt_bucket
from sparse_lm.models.loading import ModelSpec, WeightSource, build_model
from sparse_lm.results import current_command, write_result
from sparse_lm.sparse import SparseEngineConfig
from sparse_lm.tracking.base import to_jsonable
from sparse_lm.train.checkpoint import original_model_spec
from sparse_lm.utils.io import atomic_write_json

# llama.cpp (CPU build, -march=native), SmolLM2-135M F32, 2 threads, 128 tokens, measured on this machine
# type and recorded in shared/ANCHORS.md. Reported beside ours as a reference, not as our measurement.
LLAMA_CPP_F32_ANCHOR_TOKENS_PER_S = 43.0


class PredictorKind(str, enum.Enum):
    trained = "trained"  # low-rank predictors of a train_predictor run (the `predictors` folder)
    int4 = "int4"  # training-free: the FFN's own gate/up rows in 4 bits, thresholds calibrated to `int4_recall`

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class DecodeBenchConfig:
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    prompt: str = "The capital of France is"
    new_tokens: int = 128
    repeats: int = 3
    bandwidth_bytes: int = 1 << 30
    # With a predictor folder (a train_predictor run's predictors/): the sparse engine against dense, side by side
    predictors: str = ""
    # predictor_kind=int4: the sparse engine with int4 predictors built from the model itself (no folder)
    predictor_kind: PredictorKind = PredictorKind.trained
    int4_recall: float = 0.99
    sparse: SparseEngineConfig = dataclasses.field(default_factory=SparseEngineConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    calibration_tokens: int = 8192
    perplexity_tokens: int = 16384
    perplexity_context: int = 256
    # llama.cpp (the `bench` extra) decoding the model's F32 GGUF in the same run, repeats interleaved with ours
    llama_cpp: bool = False
    llama_cpp_dir: str = "runs/llama_cpp"
    progress: bool = True
    record_as: str | None = None
    results_dir: str = "results"

    def __post_init__(self):
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens must be >= 2, got {self.new_tokens}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.bandwidth_bytes < 1 << 20:
            raise ValueError(f"bandwidth_bytes must be >= 1 MiB, got {self.bandwidth_bytes}")
        object.__setattr__(self, "predictor_kind", PredictorKind(self.predictor_kind))
        if self.predictor_kind is PredictorKind.int4 and self.predictors:
            raise ValueError(f"predictors={self.predictors} is a folder of trained predictors; predictor_kind=int4 "
                             "builds its predictors from the model: leave predictors empty")
        if not 0 < self.int4_recall <= 1:
            raise ValueError(f"int4_recall must be in (0, 1], got {self.int4_recall}")

    @property
    def sparse_run(self) -> bool:
        """Whether the sparse engine is measured against dense."""
        return bool(self.predictors) or self.predictor_kind is PredictorKind.int4


def weight_bytes(model: nnx.Module) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def matvec_only_seconds(model: nnx.Module, repeats: int = 20) -> tuple[float, int]:
    """Median time of one vector through every matrix a decode step multiplies by, and nothing else.

    This isolates XLA's matrix-vector products (the bandwidth-bound part of decode) from attention,
    norms and dispatch: the gap between it and the full step is the cost of everything else.

    Returns:
      (seconds per pass, bytes of the matrices read).
    """
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    # every [in, out] matrix; an untied model's input embedding is only looked up, never multiplied
    matrices = [value.get_value() for path, value in flat if value.get_value().ndim == 2 and path != ("embed",)]

    @jax.jit
    def chain(matrices):
        scale = jnp.ones((), jnp.float32)
        for w in matrices:  # each product waits for the previous one, as in the model
            y = jnp.full((1, w.shape[0]), scale) @ w
            scale = 1.0 + 0.0 * y[0, 0]
        return scale

    chain(matrices).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        chain(matrices).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times), sum(int(w.size) * w.dtype.itemsize for w in matrices)


def run(cfg: DecodeBenchConfig, run_dir: str | Path) -> dict[str, Any]:
    """Measures decode tokens/s (median of `repeats` runs) and the bandwidth floor; writes summary.json."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", to_jsonable(cfg))
    model, tokenizer = build_model(cfg.model)
    prompt = tokenizer.encode(cfg.prompt)
    generator = Generator(model, capacity=prompt_bucket(len(prompt)) + cfg.new_tokens)
    peer = None
    if cfg.llama_cpp:
        if not llama_cpp.available():
            raise ValueError("llama_cpp=true needs llama-cpp-python: pip install -e '.[bench]' (builds llama.cpp)")
        peer = llama_cpp.LlamaCppPeer(llama_cpp.f32_gguf(cfg.llama_cpp_dir), cfg.prompt, cfg.new_tokens)
    bandwidth_before = measure_read_bandwidth(cfg.bandwidth_bytes)
    runs, peer_runs = [], []
    for _ in range(cfg.repeats):  # interleaved with llama.cpp's runs when it is measured
        runs.append(generator.generate(prompt, cfg.new_tokens))
        if peer is not None:
            peer_runs.append(peer.run()[0])
    matvec_seconds, matvec_bytes = matvec_only_seconds(model)
    bandwidth_after = measure_read_bandwidth(cfg.bandwidth_bytes)
    bandwidth = max(bandwidth_before, bandwidth_after)
    n_bytes = weight_bytes(model)
    decode = statistics.median(r.decode_tokens_per_s for r in runs)
    floor = bandwidth / n_bytes
    summary = {
        "model": model.config.name,
        "dtype": "float32",
        "batch": 1,
        "threads_available": len(os.sched_getaffinity(0)),
        "new_tokens": cfg.new_tokens,
        "repeats": cfg.repeats,
        "sparse_lm_tokens_per_s": decode,
        "sparse_lm_tokens_per_s_runs": ", ".join(f"{r.decode_tokens_per_s:.2f}" for r in runs),
        "prefill_tokens_per_s": statistics.median(r.prefill_tokens_per_s for r in runs),
        "weight_bytes_per_token": n_bytes,
        "read_bandwidth_gb_per_s": bandwidth / 1e9,
        "read_bandwidth_before_gb_per_s": bandwidth_before / 1e9,
        "read_bandwidth_after_gb_per_s": bandwidth_after / 1e9,
        "bandwidth_floor_tokens_per_s": floor,
        "fraction_of_floor": decode / floor,
        "matvec_only_tokens_per_s": 1.0 / matvec_seconds,
        "matvec_only_gb_per_s": matvec_bytes / matvec_seconds / 1e9,
        "non_matvec_ms_per_token": 1e3 * (1.0 / decode - matvec_seconds),
        "llama_cpp_f32_paper_tokens_per_s": LLAMA_CPP_F32_ANCHOR_TOKENS_PER_S,
        "ratio_to_llama_cpp_anchor": decode / LLAMA_CPP_F32_ANCHOR_TOKENS_PER_S,
    }
    if peer is not None:
        speed, generated = peer.run()
        summary["llama_cpp_tokens_per_s"] = statistics.median(peer_runs)
        summary["llama_cpp_tokens_per_s_runs"] = ", ".join(f"{v:.2f}" for v in peer_runs)
        summary["llama_cpp_first_tokens"] = peer.detokenize(generated[:8])
        summary["llama_cpp_threads"] = peer.threads
    if cfg.sparse_run:
        summary.update(compare(
            model, tokenizer, prompt, predictors_dir=cfg.predictors, int4_recall=cfg.int4_recall if
            cfg.predictor_kind is PredictorKind.int4 else None, sparse=cfg.sparse, data=cfg.data,
            new_tokens=cfg.new_tokens, repeats=cfg.repeats, calibration_tokens=cfg.calibration_tokens,
            perplexity_tokens=cfg.perplexity_tokens, context=cfg.perplexity_context, dense_weight_bytes=n_bytes,
            bandwidth=bandwidth, progress=cfg.progress, peer=peer, original=original_of(cfg.model),
        ))
    if peer is not None:
        peer.close()
    atomic_write_json(run_dir / "summary.json", summary)
    if cfg.record_as and cfg.sparse_run:
        write_sparse_result(cfg, summary)
    elif cfg.record_as:
        write_result(
            cfg.record_as,
            summary,
            command=current_command(),
            title=f"Dense decode speed of {summary['model']} (f32, batch 1, CPU)",
            notes=(
                "Decode tokens/s is the median over runs of greedy generation through the jitted KV-cache "
                "step, compile and warm-up excluded. The floor is the read bandwidth measured in the same "
                "process (jitted sum over 1 GiB, best of before/after) divided by the weight bytes read per "
                "token. `matvec_only` times one vector through every weight matrix of a step and nothing "
                "else (XLA's matrix-vector products alone); `non_matvec_ms_per_token` is the rest of the step "
                "(attention over the cache, norms, RoPE, sampling, dispatch). llama.cpp's 43 tok/s is the "
                "number recorded for this machine in shared/ANCHORS.md, not measured in this run."
            ),
            results_dir=cfg.results_dir,
        )
    return summary


def original_of(spec: ModelSpec):
    """The model a trained checkpoint was ReLU-fied from (None for other sources or a from-scratch run)."""
    if spec.source is not WeightSource.checkpoint:
        return None
    original_spec = original_model_spec(spec.path)
    return None if original_spec is None else build_model(original_spec)[0]


def write_sparse_result(cfg: DecodeBenchConfig, summary: dict[str, Any]) -> Path:
    keys = ("model", "tokens_per_s_dense", "tokens_per_s_sparse", "sparse_speedup", "perplexity_dense",
            "perplexity_sparse", "perplexity_change", "predicted_active_mean", "capacity_mean_fraction",
            "dense_floor_tokens_per_s", "sparse_floor_tokens_per_s", "read_bandwidth_gb_per_s", "implementation",
            "tokens_per_s_dense_runs", "tokens_per_s_sparse_runs", "greedy_tokens_equal_dense", "new_tokens",
            "perplexity_tokens", "llama_cpp_f32_paper_tokens_per_s", "predictor_kind", "predictor_bytes",
            "sparse_bytes_per_token", "tokens_per_s_ffn_free", "ffn_free_speedup")
    optional_keys = ("llama_cpp_tokens_per_s", "llama_cpp_tokens_per_s_runs", "llama_cpp_first_tokens",
                     "llama_cpp_threads", "tokens_per_s_llama_cpp_interleaved", "sparse_over_llama_cpp",
                     "int4_target_recall", "recall_validation_mean", "true_active_mean", "gate_passed_mean",
                     "fired_predicted_mean", "perplexity_original", "perplexity_sparse_over_original",
                     "original_activation")
    metrics = {k: summary[k] for k in keys} | {k: summary[k] for k in optional_keys if k in summary}
    return write_result(
        cfg.record_as, metrics, command=current_command(),
        title=f"Sparse decode engine ({summary['predictor_kind']} predictors) against dense: {summary['model']} "
              "(f32, batch 1, CPU)",
        notes=(
            "Dense and sparse greedy decode through the same jitted KV-cache step, repeats interleaved in one run "
            "(median). Sparse: each layer's predictor selects the neurons (logits above its recall-calibrated "
            "threshold, capped at the layer's capacity = the `capacity_quantile` of predicted counts on training "
            "tokens), and the FFN reads only those rows (kernels_pallas, the C++ twin on CPU). Perplexity on the "
            "validation tokens with the same neurons kept (full-sequence forward). Floors: bytes read per token / "
            "the read bandwidth measured in the same run. `greedy_tokens_equal_dense`: how many of the first "
            "run's generated tokens match the dense model's. `llama_cpp_*`: llama.cpp (llama-cpp-python, same thread "
            "count) decoding the original SmolLM2 written as an F32 GGUF, measured in this run (it has no dReLU, and "
            "the original has the same shapes, hence the same bytes per token); `llama_cpp_f32_paper_tokens_per_s` "
            "is the number in shared/ANCHORS.md. predictor_kind int4: the predictors are the model's own gate/up "
            "rows in 4 bits (kernels_pallas.quant_predict, training-free, thresholds calibrated to "
            "`int4_target_recall` on training tokens); one C++ call per layer and token scores the neurons, reads "
            "the float32 gate row of each predicted one, the up row only where the gate passed and the down row "
            "only where the activation is not zero; the floor counts those rows on validation tokens. "
            "`tokens_per_s_ffn_free`: the same decode step with every FFN skipped (output zero), measured "
            "interleaved with the others: the ceiling of any sparse FFN. `perplexity_original`: the model before "
            "its ReLU-fication (for a trained checkpoint) on the same validation tokens."
        ),
        results_dir=cfg.results_dir,
    )
