"""The disk tier measured end to end: decode with the FFN rows under a RAM budget, the segmented neuron cache against
naive whole-layer loading, side by side in one run (interleaved repeats), with the all-in-RAM sparse engine as the
reference both must reproduce token for token.

Every path runs the same decode step: attention, norms, output head and int4 predictors in RAM; each layer's FFN
takes the predicted neurons' rows from its storage (sparse_lm.offload.disk_cache). Prompts are fed one token at a
time through that step (a prefill would need every FFN row), and only the generated tokens are timed. The bundle is
read with O_DIRECT, so nothing comes from the page cache.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from kernels_pallas.cpu import collapse_to_huge_pages
from sparse_lm.data import DataConfig, Split, pack_sequences, split_tokens
from sparse_lm.eval.generate import Generator
from sparse_lm.models.loading import ModelSpec, WeightSource, build_model
from sparse_lm.models.transformer import init_cache
from sparse_lm.offload.disk import DiskSpeed, direct_io_alignment, ensure_bundle, measure_disk
from sparse_lm.offload.disk_cache import (
    DiskTier,
    DiskTierConfig,
    HotRanking,
    NaiveLayerLoader,
    NeuronCache,
    TierStats,
    plan_cache,
    plan_naive,
)
from sparse_lm.offload.disk_decode import access_profile, fixed_region_model, install_disk_tier
from sparse_lm.predictors.quantized import Int4PredictorSet, calibrate
from sparse_lm.results import current_command, write_result
from sparse_lm.sparse import SparseEngineConfig, choose_capacities, install, predicted_counts
from sparse_lm.tracking.base import to_jsonable
from sparse_lm.utils.io import atomic_write_json

RELUFY_COMMAND = "python experiments/train.py experiment=relufy_smollm2_drelu"


@dataclasses.dataclass(frozen=True)
class DiskTierBenchConfig:
    """Attributes:
    budgets: RAM budgets (fractions of the FFN weights) of the sweep; `disk.budget_fraction` is the headline one
      and is added to the sweep if missing.
    prompt_tokens: the prompt is the first this many tokens of the corpus split `data.split`.
    read_ahead_margin: the cache guesses each next layer's neurons with the threshold lowered by this much and reads
      them during the next attention; null turns read-ahead off. The naive loader never reads ahead.
    """

    model: ModelSpec = dataclasses.field(default_factory=lambda: ModelSpec(
        source=WeightSource.checkpoint, path="runs/train/relufy_smollm2_drelu"))
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    disk: DiskTierConfig = dataclasses.field(default_factory=DiskTierConfig)
    sparse: SparseEngineConfig = dataclasses.field(default_factory=SparseEngineConfig)
    budgets: tuple[float, ...] = (0.25, 0.5, 0.75)
    prompt_tokens: int = 32
    new_tokens: int = 64
    repeats: int = 3
    int4_recall: float = 0.99
    calibration_tokens: int = 8192
    read_ahead_margin: float | None = -0.005
    random_reads: int = 20000
    progress: bool = True
    record_as: str | None = None
    results_dir: str = "results"

    def __post_init__(self):
        budgets = tuple(float(b) for b in self.budgets)
        if not budgets or not all(0 < b <= 1 for b in budgets):
            raise ValueError(f"budgets must be fractions in (0, 1], got {self.budgets}")
        if self.disk.budget_fraction not in budgets:
            budgets += (self.disk.budget_fraction,)
        object.__setattr__(self, "budgets", tuple(sorted(set(budgets))))
        for key, low in (("prompt_tokens", 1), ("new_tokens", 2), ("repeats", 1), ("calibration_tokens", 256),
                         ("random_reads", 100)):
            if getattr(self, key) < low:
                raise ValueError(f"{key} must be >= {low}, got {getattr(self, key)}")
        if not 0 < self.int4_recall <= 1:
            raise ValueError(f"int4_recall must be in (0, 1], got {self.int4_recall}")


@dataclasses.dataclass(frozen=True)
class DecodeRun:
    tokens: list[int]  # generated, the first one from the last prompt step
    seconds: float  # of the len(tokens) - 1 timed steps
    stats: TierStats | None  # tier counters over the timed steps

    @property
    def tokens_per_s(self) -> float:
        return (len(self.tokens) - 1) / self.seconds


def _delta(after: TierStats, before: TierStats) -> TierStats:
    fields = {f.name: getattr(after, f.name) - getattr(before, f.name) for f in dataclasses.fields(TierStats)}
    return TierStats(**fields | {"resident_bytes": after.resident_bytes, "io_uring": after.io_uring,
                                 "queue_depth": after.queue_depth, "registered_buffers": after.registered_buffers})


def decode(generator: Generator, prompt: list[int], new_tokens: int, tier: DiskTier | None = None) -> DecodeRun:
    """Greedy decode: the prompt one token at a time through the decode step, then `new_tokens` tokens, of which
    all but the first are timed. A tier is reset first (counters zero, LRU region empty; the hot region stays)."""
    if tier is not None:
        tier.reset()
    cache = init_cache(generator.config, 1, generator.capacity)
    rng = jax.random.key(generator.sampling.seed)
    for token in prompt:
        nxt, cache, rng = generator.decode_step(jnp.asarray([token], jnp.int32), cache, rng)
    out = [int(np.asarray(nxt)[0])]
    before = tier.stats() if tier is not None else None
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        nxt, cache, rng = generator.decode_step(nxt, cache, rng)
        out.append(int(np.asarray(nxt)[0]))  # the host needs every token (see Generator.generate)
    seconds = time.perf_counter() - start
    return DecodeRun(out, seconds, _delta(tier.stats(), before) if tier is not None else None)


def fixed_region_bytes(model, predictors: Int4PredictorSet, kv_positions: int) -> dict[str, int]:
    """What stays in RAM besides the FFN rows: attention, embeddings and head, norms, int4 predictors, KV cache."""
    parts = {"attention": 0, "embedding_and_head": 0, "norms": 0}
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = [str(p) for p in path]
        size = int(value.get_value().size) * value.get_value().dtype.itemsize
        if "ffn" in names:
            continue
        key = "attention" if "attn" in names else "norms" if any("norm" in n for n in names) else "embedding_and_head"
        parts[key] += size
    c = model.config
    parts["predictors"] = predictors.nbytes()
    parts["kv_cache"] = 2 * c.n_layers * kv_positions * c.n_kv_heads * c.resolved_head_dim * 4
    return parts


def _per_token(stats: list[TierStats], runs: list[DecodeRun], field: str) -> float:
    return sum(getattr(s, field) for s in stats) / sum(len(r.tokens) - 1 for r in runs)


def _summarise_tier(prefix: str, runs: list[DecodeRun]) -> dict[str, Any]:
    stats = [r.stats for r in runs]
    tokens = sum(len(r.tokens) - 1 for r in runs)
    seconds = sum(r.seconds for r in runs)
    out = {
        f"tokens_per_s_{prefix}": statistics.median(r.tokens_per_s for r in runs),
        f"tokens_per_s_{prefix}_runs": ", ".join(f"{r.tokens_per_s:.2f}" for r in runs),
        f"hit_rate_{prefix}": sum(s.hits for s in stats) / sum(s.accesses for s in stats),
        # resident before any read-ahead of the token: hits minus those that read-ahead brought in
        f"hit_rate_without_read_ahead_{prefix}": sum(s.hits - s.prefetch_used for s in stats) / sum(
            s.accesses for s in stats),
        f"bytes_per_token_{prefix}": _per_token(stats, runs, "bytes_read"),
        f"reads_per_token_{prefix}": _per_token(stats, runs, "reads"),
        f"demand_reads_per_token_{prefix}": _per_token(stats, runs, "misses") if prefix == "cache" else
        _per_token(stats, runs, "reads"),
        f"prefetch_reads_per_token_{prefix}": _per_token(stats, runs, "prefetch_reads"),
        f"prefetch_used_per_token_{prefix}": _per_token(stats, runs, "prefetch_used"),
        f"read_wait_ms_per_token_{prefix}": 1e3 * _per_token(stats, runs, "read_seconds"),
        f"ffn_ms_per_token_{prefix}": 1e3 * _per_token(stats, runs, "ffn_seconds"),
        f"total_ms_per_token_{prefix}": 1e3 * seconds / tokens,
        f"resident_bytes_{prefix}": stats[0].resident_bytes,
    }
    out[f"rest_ms_per_token_{prefix}"] = (out[f"total_ms_per_token_{prefix}"] - out[f"read_wait_ms_per_token_{prefix}"]
                                          - out[f"ffn_ms_per_token_{prefix}"])
    return out


def run(cfg: DiskTierBenchConfig, run_dir: str | Path) -> dict[str, Any]:
    """Measures cache, naive and all-in-RAM decode at every budget; writes summary.json (and a result)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", to_jsonable(cfg))
    if cfg.model.source is WeightSource.checkpoint and not Path(cfg.model.path).is_dir():
        raise FileNotFoundError(f"model.path={cfg.model.path}: no such training run; the ReLU-fied SmolLM2 is made "
                                f"by `{RELUFY_COMMAND}`")
    model, tokenizer = build_model(cfg.model)
    config = model.config
    train = split_tokens(cfg.data.with_split(Split.train), tokenizer, progress=cfg.progress)
    rows = pack_sequences(train[: cfg.calibration_tokens], 256).tokens
    predictors = Int4PredictorSet(model)
    calibrate(model, predictors, rows, cfg.int4_recall, progress=cfg.progress)
    capacities = choose_capacities(predicted_counts(model, predictors, rows), config.d_ff,
                                   cfg.sparse.capacity_quantile, cfg.sparse.capacity_multiple)
    predicted, fired, profile_tokens = access_profile(model, predictors, capacities, rows)
    frequency = predicted if cfg.disk.hot_ranking is HotRanking.predicted else fired
    prompt = [int(t) for t in split_tokens(cfg.data, tokenizer, progress=cfg.progress)[: cfg.prompt_tokens]]
    if len(prompt) < cfg.prompt_tokens:
        raise ValueError(f"data split {cfg.data.split.value} has {len(prompt)} tokens, fewer than prompt_tokens")

    name = Path(cfg.model.path).name if cfg.model.path else config.name
    bundle_path = Path(cfg.disk.bundle_dir) / f"{name}.bundle"
    layout, bundle_status = ensure_bundle(bundle_path, model)
    align = direct_io_alignment(bundle_path)
    speed_args = dict(queue_depth=cfg.disk.queue_depth, sequential_depth=cfg.disk.layer_queue_depth,
                      chunk_bytes=cfg.disk.layer_chunk_bytes, random_reads=cfg.random_reads)
    speed_before = measure_disk(bundle_path, layout, align, **speed_args)

    kv_positions = cfg.prompt_tokens + cfg.new_tokens
    fixed = fixed_region_bytes(model, predictors, kv_positions)
    tier_models = {}  # budget -> (cache, naive, their fixed-region models), built before the reference is installed
    for budget in cfg.budgets:
        budget_bytes = int(budget * layout.ffn_bytes)
        min_lru = (2 if cfg.read_ahead_margin is not None else 1) * max(capacities)
        plan = plan_cache(layout, align, frequency, budget_bytes, cfg.disk.lru_fraction, min_lru)
        cache = NeuronCache.open(bundle_path, layout, align, plan, cfg.disk)
        naive = NaiveLayerLoader.open(bundle_path, layout, align, plan_naive(layout, budget_bytes), cfg.disk)
        cache_model, naive_model = fixed_region_model(model), fixed_region_model(model)
        install_disk_tier(cache_model, predictors, capacities, cache, cfg.read_ahead_margin)
        install_disk_tier(naive_model, predictors, capacities, naive)
        tier_models[budget] = (plan, cache, naive, cache_model, naive_model)
    install(model, predictors, capacities, cfg.sparse.implementation)
    huge = collapse_to_huge_pages(*jax.tree.leaves(nnx.state(model))) if cfg.sparse.huge_pages else 0
    kv_capacity = cfg.prompt_tokens + cfg.new_tokens
    ram = Generator(model, capacity=kv_capacity)

    rows_out, runs_by_budget = [], {}
    progress = tqdm(total=len(cfg.budgets) * cfg.repeats, desc="disk tier decode", disable=not cfg.progress)
    for budget in cfg.budgets:
        plan, cache, naive, cache_model, naive_model = tier_models[budget]
        generators = {"ram": ram, "cache": Generator(cache_model, capacity=kv_capacity),
                      "naive": Generator(naive_model, capacity=kv_capacity)}
        tiers = {"ram": None, "cache": cache, "naive": naive}
        for key, generator in generators.items():  # compiles and warms each step
            decode(generator, prompt[:2], 2, tiers[key])
        runs = {key: [] for key in generators}
        for _ in range(cfg.repeats):  # interleaved: all three see the same machine state
            for key, generator in generators.items():
                runs[key].append(decode(generator, prompt, cfg.new_tokens, tiers[key]))
            progress.update()
        runs_by_budget[budget] = runs
        row = {"budget_fraction": budget, "budget_bytes": plan.budget_bytes, "hot_neurons": len(plan.hot_keys),
               "lru_slots": plan.lru_slots, "pinned_layers": naive.pinned_layers,
               "tokens_per_s_ram": statistics.median(r.tokens_per_s for r in runs["ram"])}
        row |= _summarise_tier("cache", runs["cache"]) | _summarise_tier("naive", runs["naive"])
        row["speedup"] = statistics.median(c.tokens_per_s / n.tokens_per_s
                                           for c, n in zip(runs["cache"], runs["naive"], strict=True))
        row["speedup_ceiling"] = statistics.median(r.tokens_per_s / n.tokens_per_s
                                                   for r, n in zip(runs["ram"], runs["naive"], strict=True))
        row["tokens_equal_cache"] = min(sum(a == b for a, b in zip(c.tokens, r.tokens, strict=True))
                                        for c, r in zip(runs["cache"], runs["ram"], strict=True))
        row["tokens_equal_naive"] = min(sum(a == b for a, b in zip(n.tokens, r.tokens, strict=True))
                                        for n, r in zip(runs["naive"], runs["ram"], strict=True))
        rows_out.append(row)
        for tier in (cache, naive):
            tier.close()
        del generators
    progress.close()
    speed_after = measure_disk(bundle_path, layout, align, **speed_args)
    summary = _summary(cfg, config, layout, bundle_status, bundle_path, align, speed_before, speed_after, fixed,
                       rows_out, runs_by_budget, capacities, profile_tokens, huge, tokenizer, prompt)
    atomic_write_json(run_dir / "summary.json", summary)
    if cfg.record_as:
        _write_result(cfg, summary)
    return summary


def _summary(cfg, config, layout, bundle_status, bundle_path, align, speed_before: DiskSpeed, speed_after: DiskSpeed,
             fixed, rows, runs_by_budget, capacities, profile_tokens, huge, tokenizer, prompt) -> dict[str, Any]:
    head = next(r for r in rows if r["budget_fraction"] == cfg.disk.budget_fraction)
    sequential = max(speed_before.sequential_gb_per_s, speed_after.sequential_gb_per_s) * 1e9
    random_per_s = max(speed_before.random_reads_per_s, speed_after.random_reads_per_s)
    for row in rows:  # the disk alone, at the speeds measured in this run
        row["io_floor_ms_per_token_naive"] = 1e3 * row["bytes_per_token_naive"] / sequential
        row["io_floor_ms_per_token_cache"] = 1e3 * max(row["bytes_per_token_cache"] / sequential,
                                                       row["reads_per_token_cache"] / random_per_s)
    ram_runs = runs_by_budget[cfg.disk.budget_fraction]["ram"]
    return {
        "model": config.name,
        "model_path": cfg.model.path,
        "budget_fraction": cfg.disk.budget_fraction,
        "tokens_per_s_cache": head["tokens_per_s_cache"],
        "tokens_per_s_naive": head["tokens_per_s_naive"],
        "tokens_per_s_ram": head["tokens_per_s_ram"],
        "speedup": head["speedup"],
        "speedup_ceiling": head["speedup_ceiling"],
        "speedup_target_met": bool(head["speedup"] >= 5),
        "hit_rate": head["hit_rate_cache"],
        "hit_rate_naive": head["hit_rate_naive"],
        "hit_rate_without_read_ahead": head["hit_rate_without_read_ahead_cache"],
        "bytes_per_token": head["bytes_per_token_cache"],
        "bytes_per_token_naive": head["bytes_per_token_naive"],
        "reads_per_token": head["reads_per_token_cache"],
        "demand_reads_per_token": head["demand_reads_per_token_cache"],
        "prefetch_reads_per_token": head["prefetch_reads_per_token_cache"],
        "prefetch_used_per_token": head["prefetch_used_per_token_cache"],
        "io_floor_ms_per_token_cache": head["io_floor_ms_per_token_cache"],
        "io_floor_ms_per_token_naive": head["io_floor_ms_per_token_naive"],
        "ms_per_token_cache": {k: head[f"{k}_ms_per_token_cache"] for k in ("total", "read_wait", "ffn", "rest")},
        "ms_per_token_naive": {k: head[f"{k}_ms_per_token_naive"] for k in ("total", "read_wait", "ffn", "rest")},
        "ms_per_token_ram": 1e3 / head["tokens_per_s_ram"],
        "tokens_equal_cache": head["tokens_equal_cache"],
        "tokens_equal_naive": head["tokens_equal_naive"],
        "new_tokens": cfg.new_tokens,
        "repeats": cfg.repeats,
        "prompt_tokens": len(prompt),
        "prompt": tokenizer.decode(prompt),
        "generated": tokenizer.decode(ram_runs[0].tokens),
        "disk_sequential_gb_per_s": sequential / 1e9,
        "disk_sequential_gb_per_s_before_after": [speed_before.sequential_gb_per_s, speed_after.sequential_gb_per_s],
        "disk_random_reads_per_s": random_per_s,
        "disk_random_reads_per_s_before_after": [speed_before.random_reads_per_s, speed_after.random_reads_per_s],
        "disk_random_gb_per_s": max(speed_before.random_gb_per_s, speed_after.random_gb_per_s),
        "disk_queue_depth": cfg.disk.queue_depth,
        "disk_read_bytes": speed_before.read_bytes,
        "disk_layer_chunk_bytes": cfg.disk.layer_chunk_bytes,
        "disk_layer_queue_depth": cfg.disk.layer_queue_depth,
        "io_uring": speed_before.io_uring,
        "direct_io_block_bytes": align,
        "bundle_path": str(bundle_path),
        "bundle_status": bundle_status,
        "bundle_bytes": layout.file_bytes,
        "neuron_bundle_bytes": layout.neuron_bytes,
        "neuron_read_bytes": layout.window_bytes(align),
        "ffn_weight_bytes": layout.ffn_bytes,
        "fixed_region_bytes": sum(fixed.values()),
        "fixed_region": fixed,
        "huge_page_bytes": huge,
        "capacities": capacities,
        "profile_tokens": profile_tokens,
        "hot_ranking": cfg.disk.hot_ranking.value,
        "lru_fraction": cfg.disk.lru_fraction,
        "read_ahead_margin": cfg.read_ahead_margin,
        "per_budget": rows,
    }


BUDGET_COLUMNS = ("budget_fraction", "tokens_per_s_cache", "tokens_per_s_naive", "tokens_per_s_ram", "speedup",
                  "speedup_ceiling", "hit_rate_cache", "hit_rate_without_read_ahead_cache", "hit_rate_naive",
                  "bytes_per_token_cache",
                  "bytes_per_token_naive", "reads_per_token_cache", "demand_reads_per_token_cache",
                  "prefetch_reads_per_token_cache", "prefetch_used_per_token_cache", "read_wait_ms_per_token_cache",
                  "ffn_ms_per_token_cache", "rest_ms_per_token_cache", "read_wait_ms_per_token_naive",
                  "io_floor_ms_per_token_cache", "io_floor_ms_per_token_naive", "hot_neurons", "lru_slots",
                  "pinned_layers", "resident_bytes_cache", "resident_bytes_naive", "budget_bytes",
                  "tokens_equal_cache", "tokens_equal_naive", "tokens_per_s_cache_runs", "tokens_per_s_naive_runs")


def _write_result(cfg: DiskTierBenchConfig, summary: dict[str, Any]) -> Path:
    flat = {k: v for k, v in summary.items() if not isinstance(v, dict | list)}
    flat |= {f"ms_per_token_cache_{k}": v for k, v in summary["ms_per_token_cache"].items()}
    flat |= {f"ms_per_token_naive_{k}": v for k, v in summary["ms_per_token_naive"].items()}
    flat |= {f"fixed_region_bytes_{k}": v for k, v in summary["fixed_region"].items()}
    table = {"title": "Per budget (fraction of the FFN weights in RAM)", "columns": list(BUDGET_COLUMNS),
             "rows": [[row[c] for c in BUDGET_COLUMNS] for row in summary["per_budget"]]}
    return write_result(
        cfg.record_as, flat, command=current_command(), tables=[table], results_dir=cfg.results_dir,
        title=f"Disk tier: neuron cache vs naive whole-layer loading, {summary['model']} ({summary['model_path']}), "
              f"f32, batch 1, CPU{'' if cfg.read_ahead_margin is not None else ', no read-ahead'}",
        notes=(
            "Decode with the FFN rows on disk under a RAM budget (a fraction of the FFN weights; attention, "
            "embeddings, norms, output head, int4 predictors and the KV cache stay in RAM: `fixed_region_bytes`). "
            "One decode step for all paths; each layer's FFN is one FFI call taking the int4 predictor's neurons "
            "from its tier and computing them with the in-RAM engine's arithmetic, so `tokens_equal_*` counts "
            "generated tokens equal to the all-in-RAM sparse engine's (greedy, same prompt fed token by token). "
            "Cache: the hottest neurons of a calibration profile resident, an LRU region of neuron windows, misses "
            "read with O_DIRECT (io_uring, `disk_queue_depth` in flight), plus read-ahead of each next layer's "
            "guessed neurons during its attention (`prefetch_*`, counted in bytes and reads). Naive: the first layers "
            "that fit beside one layer buffer pinned, every other layer read whole (chunked O_DIRECT) each time it is "
            "used. Repeats interleaved (ram, cache, naive); tokens/s is the median, `speedup` the median of "
            "per-repeat ratios, `speedup_ceiling` the all-in-RAM engine over naive (no cache can beat it). Disk "
            "speeds measured on the bundle file in the same run; `io_floor_*` = that disk's time for the bytes and "
            "reads per token. O_DIRECT bypasses this VM's page cache; the hypervisor's host cache, if any, is "
            "outside our view."
        ),
    )
