"""The profile task: firing counts of a model on one or two corpora, their statistics and power-law fit."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from sparse_lm.data import Corpus, DataConfig, Split, corpus_fingerprint, pack_sequences, split_tokens
from sparse_lm.models.loading import ModelSpec, build_model
from sparse_lm.models.transformer import Transformer
from sparse_lm.profiling import stats
from sparse_lm.profiling.counts import FiringCounts
from sparse_lm.profiling.firing import FiringConfig, FiringRule
from sparse_lm.profiling.powerlaw_fit import firing_frequency_samples, fit_power_law
from sparse_lm.profiling.profiler import calibrate_thresholds, collect_abs_activations, profile_sequences
from sparse_lm.profiling.report import write_profile_result
from sparse_lm.results import current_command
from sparse_lm.tracking import TrackerConfig, make_tracker
from sparse_lm.tracking.base import to_jsonable
from sparse_lm.utils.io import atomic_write_json


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """Attributes:
    tokens: tokens profiled per corpus (rounded down to whole batches of batch_size x seq_len).
    compare_corpus: a second corpus (same split settings) profiled alike, for cross-domain overlap.
    coverage_level: the share of firings the coverage fraction is reported for (PowerInfer: 80%).
    hot_fraction: top fraction of neurons per layer compared across domains (PowerInfer: 20%).
    bootstrap: power-law bootstrap resamples for the exponent's confidence interval.
    """

    tokens: int = 131072
    seq_len: int = 512
    batch_size: int = 4
    checkpoint_every: int = 16
    compare_corpus: Corpus | None = None
    coverage_level: float = 0.8
    hot_fraction: float = 0.2
    bootstrap: int = 100
    speed_batches: int = 4
    extra_rules: tuple[FiringRule, ...] = ()
    progress: bool = True

    def __post_init__(self):
        rules = tuple(FiringRule(rule) for rule in self.extra_rules)
        if FiringRule.magnitude in rules:
            raise ValueError("profile.extra_rules cannot hold magnitude (it needs thresholds): make it firing.rule")
        object.__setattr__(self, "extra_rules", rules)
        if self.compare_corpus is not None:
            object.__setattr__(self, "compare_corpus", Corpus(self.compare_corpus))
        for field in ("tokens", "seq_len", "batch_size", "checkpoint_every"):
            if getattr(self, field) < 1:
                raise ValueError(f"profile.{field} must be >= 1, got {getattr(self, field)}")
        for field in ("coverage_level", "hot_fraction"):
            if not 0 < getattr(self, field) <= 1:
                raise ValueError(f"profile.{field} must be in (0, 1], got {getattr(self, field)}")
        if self.bootstrap < 0 or self.speed_batches < 0:
            raise ValueError("profile.bootstrap and profile.speed_batches must be >= 0")


@dataclasses.dataclass(frozen=True)
class ProfileRunConfig:
    """Everything `experiments/profile.py` composes (schema of `conf/profile.yaml`)."""

    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(split=Split.train))
    firing: FiringConfig = dataclasses.field(default_factory=FiringConfig)
    profile: ProfileConfig = dataclasses.field(default_factory=ProfileConfig)
    tracker: TrackerConfig = dataclasses.field(default_factory=TrackerConfig)
    record_as: str | None = None
    results_dir: str = "results"


def corpus_sequences(data: DataConfig, tokenizer, cfg: ProfileConfig) -> np.ndarray:
    """The first `cfg.tokens` tokens of the split, packed into rows of seq_len (whole batches only)."""
    tokens = split_tokens(data, tokenizer, progress=cfg.progress)
    packed = pack_sequences(tokens, cfg.seq_len).tokens
    rows = min(len(packed), cfg.tokens // cfg.seq_len) // cfg.batch_size * cfg.batch_size
    if rows == 0:
        raise ValueError(
            f"data.corpus={data.corpus.value} split={data.split.value} has {len(tokens)} tokens: not one batch of "
            f"{cfg.batch_size} x {cfg.seq_len}; lower profile.batch_size or profile.seq_len"
        )
    return packed[:rows]


def calibration_data(data: DataConfig) -> DataConfig:
    """Thresholds are calibrated on other documents than the profiled ones where the corpus has a split."""
    if data.split in (Split.train, Split.all):
        return data.replace(split=Split.validation) if data.corpus is not Corpus.textfile else data
    return data.replace(split=Split.train)


def plain_forward_seconds(model: Transformer, sequences: np.ndarray, batch_size: int, n_batches: int) -> float:
    """Seconds per batch of the plain jitted forward (logits), for the profiling overhead."""
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens)[0])
    forward(params, sequences[:batch_size]).block_until_ready()
    times = []
    for index in range(n_batches):
        batch = sequences[index * batch_size : (index + 1) * batch_size]
        start = time.perf_counter()
        forward(params, batch).block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def firing_thresholds(
    model: Transformer, tokenizer, firing: FiringConfig, data: DataConfig, profile: ProfileConfig
) -> np.ndarray:
    """Per-layer magnitude thresholds: the given ones, or calibrated on other documents than `data`'s
    (`calibration_data`) to `firing.target_sparsity`; zeros for rules without thresholds."""
    n_layers = model.config.n_layers
    if firing.thresholds is not None:
        given = np.asarray(firing.thresholds, np.float64)
        if len(given) not in (1, n_layers):
            raise ValueError(f"firing.thresholds has {len(given)} values; give 1 or n_layers={n_layers}")
        return np.broadcast_to(given, (n_layers,)).copy()
    if not firing.needs_calibration():
        return np.zeros(n_layers)
    calibration = corpus_sequences(calibration_data(data), tokenizer, dataclasses.replace(
        profile, tokens=max(firing.calibration_tokens, profile.seq_len * profile.batch_size)))
    activations = collect_abs_activations(model, calibration, firing.calibration_tokens, profile.batch_size)
    return calibrate_thresholds(activations, firing.target_sparsity)


def fingerprint(cfg: ProfileRunConfig, data: DataConfig, thresholds: np.ndarray) -> str:
    blob = json.dumps([to_jsonable(cfg.model), to_jsonable(data), to_jsonable(cfg.firing),
                       cfg.profile.tokens, cfg.profile.seq_len, cfg.profile.batch_size, thresholds.tolist(),
                       [rule.value for rule in cfg.profile.extra_rules]])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def domain_statistics(counts: FiringCounts, cfg: ProfileConfig) -> dict[str, Any]:
    rate = stats.firing_rate(counts.counts, counts.tokens)
    return {
        "tokens": counts.tokens,
        "firing_rate_per_layer": rate.tolist(),
        "sparsity_per_layer": (1 - rate).tolist(),
        "sparsity_model": 1 - stats.model_firing_rate(counts.counts, counts.tokens),
        "coverage80_per_layer": stats.coverage_per_layer(counts.counts, cfg.coverage_level).tolist(),
        "coverage80_model": stats.coverage_model(counts.counts, cfg.coverage_level),
        "gini_per_layer": [stats.gini(layer) for layer in counts.counts],
        **{f"sparsity_per_layer_{name}": (1 - stats.firing_rate(extra, counts.tokens)).tolist()
           for name, extra in counts.extra.items()},
        **{f"sparsity_model_{name}": 1 - stats.model_firing_rate(extra, counts.tokens)
           for name, extra in counts.extra.items()},
    }


def run(cfg: ProfileRunConfig, run_dir: str | Path) -> dict[str, Any]:
    """Profiles `cfg.data` (and `cfg.profile.compare_corpus`); writes counts, summary.json and figures' data."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", to_jsonable(cfg))
    tracker = make_tracker(cfg.tracker, run_dir, run_config=to_jsonable(cfg), run_name=run_dir.name)
    with tracker:
        model, tokenizer = build_model(cfg.model)
        n_layers = model.config.n_layers
        domains = [cfg.data]
        if cfg.profile.compare_corpus is not None and cfg.profile.compare_corpus is not cfg.data.corpus:
            domains.append(cfg.data.replace(corpus=cfg.profile.compare_corpus, path=None))
        thresholds = firing_thresholds(model, tokenizer, cfg.firing, cfg.data, cfg.profile)
        summary: dict[str, Any] = {
            "model": model.config.name,
            "activation": model.config.activation.value,
            "firing_rule": cfg.firing.rule.value,
            "thresholds": thresholds.tolist(),
            "corpus_sha256": {d.corpus.value: corpus_fingerprint(d) for d in domains},
            "config": to_jsonable(cfg),
        }
        all_counts = []
        for domain in domains:
            name = domain.corpus.value
            sequences = corpus_sequences(domain, tokenizer, cfg.profile)
            counts, seconds, timed = profile_sequences(
                model, sequences, cfg.firing, thresholds, batch_size=cfg.profile.batch_size,
                checkpoint=run_dir / f"counts_{name}.npz", checkpoint_every=cfg.profile.checkpoint_every,
                fingerprint=fingerprint(cfg, domain, thresholds), progress=cfg.profile.progress,
                extra_rules=cfg.profile.extra_rules,
            )
            all_counts.append(counts)
            domain_summary = domain_statistics(counts, cfg.profile)
            # throughput of the batches this call profiled (none when it resumed a finished checkpoint)
            domain_summary["profile_tokens_per_s"] = (
                timed * cfg.profile.batch_size * cfg.profile.seq_len / seconds if timed else float("nan")
            )
            summary[name] = domain_summary
            tracker.log({f"{name}/sparsity_model": domain_summary["sparsity_model"],
                         f"{name}/coverage80_model": domain_summary["coverage80_model"]})
        total = FiringCounts.zeros(n_layers, model.config.d_ff, extra_rules=[r.value for r in cfg.profile.extra_rules])
        for counts in all_counts:
            total.add(counts.counts, counts.abs_sum, counts.tokens, counts.extra)
        total.save(run_dir / "counts_total.npz")
        summary.update(domain_statistics(total, cfg.profile))
        summary["corpora"] = [d.corpus.value for d in domains]
        if len(all_counts) == 2:
            overlap = stats.top_set_overlap(all_counts[0].counts, all_counts[1].counts, cfg.profile.hot_fraction)
            summary["hot_overlap_per_layer"] = overlap.tolist()
            summary["hot_overlap_mean"] = float(np.mean(overlap))
        samples = firing_frequency_samples(total.counts)
        # Counts run into the thousands and more: the continuous law is then an exact-enough model, and the
        # package's discrete normalisation breaks down there (KS distance 1.0 measured at x ~ 5e5).
        fit = fit_power_law(samples, discrete=bool(samples.min() < 100), bootstrap=cfg.profile.bootstrap)
        summary["powerlaw"] = fit.to_summary()
        # speed of the profiling step against the plain forward, measured side by side now
        sequences = corpus_sequences(domains[0], tokenizer, cfg.profile)
        n_speed = min(cfg.profile.speed_batches, len(sequences) // cfg.profile.batch_size)
        if n_speed:
            plain = plain_forward_seconds(model, sequences, cfg.profile.batch_size, n_speed)
            _, profiled, timed = profile_sequences(
                model, sequences[: (n_speed + 1) * cfg.profile.batch_size], cfg.firing, thresholds,
                batch_size=cfg.profile.batch_size, progress=False, extra_rules=cfg.profile.extra_rules,
            )
            batch_tokens = cfg.profile.batch_size * cfg.profile.seq_len
            profiled_per_batch = profiled / max(timed, 1)
            summary["plain_forward_tokens_per_s"] = batch_tokens / plain
            summary["profile_step_tokens_per_s"] = batch_tokens / profiled_per_batch
            summary["profile_overhead"] = profiled_per_batch / plain - 1
        tracker.log_summary({k: v for k, v in summary.items() if isinstance(v, int | float | str)})
        atomic_write_json(run_dir / "summary.json", to_jsonable(summary))
    if cfg.record_as:
        write_profile_result(cfg.record_as, summary, to_jsonable(cfg.firing), total.counts,
                             command=current_command(), results_dir=cfg.results_dir)
    return summary
