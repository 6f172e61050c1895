"""The perplexity-sparsity frontier: every sparsity method on the same validation tokens of both corpora.

Rows: the dense model; each training-free rule (`profiling.training_free`) at each target sparsity, with a
uniform target per layer or per-layer targets allocated greedily (`teal_greedy`); and trained sparse models
(run directories of experiments/train.py, exact zeros). Every row is scored on the first `tokens` tokens of the
WEB and Python-docs validation splits with windows of `context` tokens, and its sparsity is measured on the
same tokens (the share of FFN hidden values that the rule drops, or that are exactly zero). Thresholds are
calibrated on training-split tokens of both corpora. Each finished point is saved in the run directory, so a
rerun continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from sparse_lm.data import DataConfig, pack_sequences, split_tokens
from sparse_lm.data.config import Corpus, Split
from sparse_lm.eval.generate import Generator, prompt_bucket
from sparse_lm.eval.perplexity import perplexity
from sparse_lm.models.capture import capture_forward, set_capture
from sparse_lm.models.ffn import CapturePoint
from sparse_lm.models.loading import ModelSpec, WeightSource, build_model
from sparse_lm.models.transformer import Transformer
from sparse_lm.profiling.training_free import (
    Rule,
    RuleExecutor,
    allocate_layer_sparsity,
    calibrate_rule,
    error_curves,
    ffn_inputs,
    install_rule,
    loss_curves,
)
from sparse_lm.results import current_command, write_result
from sparse_lm.tracking import TrackerConfig, make_tracker
from sparse_lm.tracking.base import to_jsonable
from sparse_lm.train.checkpoint import Checkpointer
from sparse_lm.utils.io import atomic_write_json

CORPORA = (Corpus.web, Corpus.pydocs)
GREEDY_GRID = np.round(np.arange(0.0, 0.975, 0.025), 3)


LOSS_GRID = np.array([0.0, 0.3, 0.5, 0.65, 0.75, 0.8, 0.85, 0.9, 0.95])
LOSS_WINDOWS = 2  # calibration windows per corpus on which each layer's loss sensitivity is measured


class Method(str, enum.Enum):
    teal = "teal"
    teal_greedy = "teal_greedy"  # TEAL's scores, per-layer targets allocated on each layer's measured loss increase
    teal_greedy_output = "teal_greedy_output"  # the same, allocated on each layer's FFN-output error instead
    cats = "cats"
    stat_topk = "stat_topk"
    wina = "wina"

    @property
    def rule(self) -> Rule:
        return Rule.teal if self in (Method.teal_greedy, Method.teal_greedy_output) else Rule(self.value)


@dataclasses.dataclass(frozen=True)
class FrontierConfig:
    """Attributes:
    methods, targets: the training-free rows (every method at every target sparsity).
    trained: label -> run directory of experiments/train.py, each a row with its exact-zero sparsity.
    tokens, context, batch_size: the scored tokens per corpus and the perplexity windows.
    calibration_tokens: training-split tokens per corpus on which thresholds are calibrated.
    sparsity_windows: windows per corpus on which the achieved sparsity is measured.
    """

    methods: tuple[Method, ...] = tuple(Method)
    targets: tuple[float, ...] = (0.5, 0.65, 0.8, 0.9)
    trained: dict[str, str] = dataclasses.field(default_factory=dict)
    tokens: int = 16384
    context: int = 512
    batch_size: int = 4
    calibration_tokens: int = 2048
    sparsity_windows: int = 4
    prompts: tuple[str, ...] = ("The capital of France is", "And God said,", "To read a file in Python,")
    sample_tokens: int = 40
    progress: bool = True

    def __post_init__(self):
        try:
            object.__setattr__(self, "methods", tuple(Method(m) for m in self.methods))
        except ValueError as e:
            raise ValueError(f"frontier.methods: {e}; choices: {', '.join(m.value for m in Method)}") from None
        object.__setattr__(self, "targets", tuple(float(t) for t in self.targets))
        if any(not 0 < t < 0.975 for t in self.targets):
            raise ValueError(f"frontier.targets must be in (0, 0.975), got {self.targets}")
        object.__setattr__(self, "trained", dict(self.trained))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        for label, path in self.trained.items():
            if not (Path(path) / "model_config.json").exists():
                raise FileNotFoundError(f"frontier.trained.{label}: {path} is not a training run directory "
                                        "(no model_config.json)")
        for field in ("tokens", "context", "batch_size", "calibration_tokens", "sparsity_windows"):
            if getattr(self, field) < (2 if field == "context" else 1):
                raise ValueError(f"frontier.{field} must be positive, got {getattr(self, field)}")


@dataclasses.dataclass(frozen=True)
class FrontierRunConfig:
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    frontier: FrontierConfig = dataclasses.field(default_factory=FrontierConfig)
    tracker: TrackerConfig = dataclasses.field(default_factory=TrackerConfig)
    cache_dir: str = ""
    record_as: str | None = None
    results_dir: str = "results"


def measured_sparsity(model: Transformer, windows: np.ndarray, batch_size: int) -> float:
    """Mean over layers and tokens of the FFN hidden values dropped: by the installed rule where one is installed,
    else exactly zero."""
    executors = [block.ffn.executor for block in model.blocks]
    ruled = all(isinstance(e, RuleExecutor) for e in executors)
    point = CapturePoint.ffn_input if ruled else CapturePoint.ffn_hidden
    set_capture(model, (point,))
    graphdef, state = nnx.split(model)
    set_capture(model, ())

    @jax.jit
    def dropped(state, tokens):
        m = nnx.merge(graphdef, state)
        _, captured = capture_forward(m, tokens)
        if ruled:
            return jnp.stack([1.0 - jnp.mean(block.ffn.executor.keep_mask(block.ffn, x))
                              for block, x in zip(m.blocks, captured[point], strict=True)])
        return jnp.stack([jnp.mean(h == 0) for h in captured[point]])

    parts = [np.asarray(dropped(state, windows[i : i + batch_size])) for i in range(0, len(windows), batch_size)]
    return float(np.mean(parts))


def greedy_samples(model: Transformer, tokenizer, cfg: FrontierConfig) -> list[str]:
    """The greedy continuation of each prompt (the model as configured now, dense or trained)."""
    if not cfg.prompts:
        return []
    encoded = [tokenizer.encode(p) for p in cfg.prompts]
    capacity = max(prompt_bucket(len(e)) for e in encoded) + cfg.sample_tokens
    generator = Generator(model, capacity=capacity)
    return [tokenizer.decode(generator.generate(e, cfg.sample_tokens, stop_token=tokenizer.eos_token_id).tokens,
                             skip_special_tokens=True) for e in encoded]


def _scored(tokens: dict[str, np.ndarray], cfg: FrontierConfig) -> dict[str, np.ndarray]:
    return {name: pack_sequences(t, cfg.context).tokens[: cfg.sparsity_windows] for name, t in tokens.items()}


def evaluate_point(model: Transformer, tokens: dict[str, np.ndarray], cfg: FrontierConfig) -> dict[str, float]:
    """Perplexity and measured sparsity of `model` (as configured now) on each corpus's scored tokens."""
    point: dict[str, float] = {}
    windows = _scored(tokens, cfg)
    for name, stream in tokens.items():
        result = perplexity(model, stream, context=cfg.context, batch_size=cfg.batch_size, progress=False)
        point[f"perplexity_{name}"] = result.perplexity
        point[f"sparsity_{name}"] = measured_sparsity(model, windows[name], cfg.batch_size)
    return point


class PointStore:
    """Finished points, one JSON file each under <run_dir>/points/ (a rerun skips them). The settings that change
    what a point measures are kept beside them: a rerun with other settings is refused, naming them."""

    def __init__(self, run_dir: Path, settings: dict[str, Any]):
        self.folder = run_dir / "points"
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "settings.json"
        settings = json.loads(json.dumps(to_jsonable(settings)))
        if path.exists():
            saved = json.loads(path.read_text())
            changed = sorted(k for k in saved.keys() | settings.keys() if saved.get(k) != settings.get(k))
            if changed:
                raise ValueError(f"{self.folder} holds points measured with other settings ({', '.join(changed)}); "
                                 "use a new hydra.run.dir")
        atomic_write_json(path, settings)

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.folder / f"{key}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        atomic_write_json(self.folder / f"{key}.json", to_jsonable(value))

    def trained(self, label: str) -> list[dict[str, Any]]:
        """Every stored row of trained run `label` (one per checkpoint it was scored at), fewest tokens first."""
        points = [json.loads(p.read_text()) for p in self.folder.glob(f"trained_{label}_*.json")]
        return sorted((p for p in points if p["method"] == label), key=lambda p: p["trained_tokens"])


def _calibration_rows(model: Transformer, tokenizer, cfg: FrontierRunConfig) -> np.ndarray:
    rows = []
    for corpus in CORPORA:
        stream = split_tokens(DataConfig(corpus=corpus, split=Split.train, cache_dir=cfg.cache_dir), tokenizer,
                              progress=False)
        rows.append(pack_sequences(stream[: cfg.frontier.calibration_tokens + 1], cfg.frontier.context).tokens)
    return np.concatenate(rows)


def checkpoint_tokens(run_dir: str | Path) -> int | None:
    """Tokens the latest checkpoint of a training run had seen (its metadata), None without a checkpoint."""
    checkpointer = Checkpointer(run_dir, keep=1, read_only=True)
    try:
        step = checkpointer.latest_step()
        if step is None:
            return None
        meta = checkpointer.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return int(meta["tokens_seen"])
    finally:
        checkpointer.close()


def _history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a training run's history.jsonl ([] without one)."""
    path = Path(run_dir) / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def training_curve(run_dir: str | Path) -> list[list[float]]:
    """[tokens, val perplexity web, pydocs, sparsity] of every evaluation in a run's history (the training
    evaluation's rows, not the frontier's tokens)."""
    records = _history(run_dir)
    return [[r["tokens"] if r["kind"] == "eval" else "original", r.get("val_perplexity_web", math.nan),
             r.get("val_perplexity_pydocs", math.nan), r["sparsity"]]
            for r in records if r["kind"] in ("eval", "baseline")]


def training_throughput(run_dir: str | Path) -> dict[str, float]:
    """Median tokens/s of a run's training steps and the model FLOP utilisation against the f32 matmul peak the run
    measured when it started (or resumed): {} before its first logged step."""
    records = _history(run_dir)
    steps = [r["tokens_per_s"] for r in records if r["kind"] == "train"]
    peaks = [r for r in records if r["kind"] == "throughput"]
    if not steps:
        return {}
    out = {"tokens_per_s": float(np.median(steps)), "tokens_per_hour": 3600 * float(np.median(steps))}
    if peaks:
        peak = max(p["matmul_peak_gflops"] for p in peaks) * 1e9 * peaks[-1]["devices"]
        out.update(matmul_peak_gflops=peak / 1e9, flops_per_token=peaks[-1]["flops_per_token"],
                   mfu=out["tokens_per_s"] * peaks[-1]["flops_per_token"] / peak)
    return out


def _trained_row(label: str, path: str, tokens: dict[str, np.ndarray], cfg: FrontierConfig) -> dict[str, Any]:
    model, tokenizer = build_model(ModelSpec(source=WeightSource.checkpoint, path=path))
    point = {**evaluate_point(model, tokens, cfg), "samples": greedy_samples(model, tokenizer, cfg)}
    config_path = Path(path) / "config.json"
    command = f"python experiments/train.py (run directory {path}; its config.json)"
    summary_path = Path(path) / "summary.json"
    if summary_path.exists():
        command = json.loads(summary_path.read_text()).get("command", command)
    return {**point, **training_throughput(path), "method": label, "target": float("nan"),
            "trained_tokens": checkpoint_tokens(path),
            "command": command, "activation": model.config.activation.value, "run_dir": str(path),
            "train_config": json.loads(config_path.read_text()) if config_path.exists() else None}


def run(cfg: FrontierRunConfig, run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", to_jsonable(cfg))
    f = cfg.frontier
    store = PointStore(run_dir, {
        "model": cfg.model, "tokens": f.tokens, "context": f.context, "calibration_tokens": f.calibration_tokens,
        "sparsity_windows": f.sparsity_windows, "prompts": f.prompts, "sample_tokens": f.sample_tokens,
    })
    tracker = make_tracker(cfg.tracker, run_dir, run_config=to_jsonable(cfg), run_name=run_dir.name)
    model, tokenizer = build_model(cfg.model)
    tokens = {}
    for corpus in CORPORA:
        stream = split_tokens(DataConfig(corpus=corpus, split=Split.validation, cache_dir=cfg.cache_dir), tokenizer,
                              progress=False)
        if len(stream) < f.tokens:
            raise ValueError(f"{corpus.value} validation has {len(stream)} tokens, fewer than "
                             f"frontier.tokens={f.tokens}")
        tokens[corpus.value] = stream[: f.tokens]
    command = current_command()
    rows: list[dict[str, Any]] = []
    plan = [("dense", None)] + [(m, t) for m in f.methods for t in f.targets]
    with tracker:
        inputs, calibration, curves = None, None, {}
        bar = tqdm(total=len(plan) + len(f.trained), desc="frontier", unit="point", disable=not f.progress)
        for method, target in plan:
            key = "dense" if method == "dense" else f"{method.value}_{round(100 * target)}"
            point = store.get(key)
            if point is None:
                if method == "dense":
                    install_rule(model, None, None)
                    point = {**evaluate_point(model, tokens, f), "method": "dense", "target": 0.0,
                             "samples": greedy_samples(model, tokenizer, f)}
                else:
                    if inputs is None:
                        calibration = _calibration_rows(model, tokenizer, cfg)
                        inputs = ffn_inputs(model, calibration, f.batch_size)
                    layer_targets: float | np.ndarray = target
                    if method is Method.teal_greedy_output:
                        if method not in curves:
                            curves[method] = error_curves(Rule.teal, model, inputs, GREEDY_GRID)
                        layer_targets = allocate_layer_sparsity(curves[method], GREEDY_GRID, target)
                    if method is Method.teal_greedy:
                        if method not in curves:
                            # the first LOSS_WINDOWS windows of each corpus's calibration rows
                            per_corpus = len(calibration) // len(CORPORA)
                            windows = np.concatenate([calibration[i * per_corpus: i * per_corpus + LOSS_WINDOWS]
                                                      for i in range(len(CORPORA))])
                            curves[method] = loss_curves(Rule.teal, model, inputs, windows, LOSS_GRID, f.batch_size)
                        layer_targets = allocate_layer_sparsity(curves[method], LOSS_GRID, target)
                    thresholds = calibrate_rule(method.rule, model, inputs, layer_targets)
                    install_rule(model, method.rule, thresholds)
                    point = {**evaluate_point(model, tokens, f), "method": method.value, "target": target,
                             "layer_targets": np.atleast_1d(layer_targets).tolist()}
                    install_rule(model, None, None)
                point["command"] = command
                store.put(key, point)
                tracker.log({k: v for k, v in point.items() if isinstance(v, float)}, step=len(rows))
            rows.append(point)
            bar.update(1)
        for label, path in f.trained.items():
            # one row per checkpoint: a run scored again after more training adds a row (its earlier ones stay)
            key = f"trained_{label}_{checkpoint_tokens(path)}"
            if store.get(key) is None:
                store.put(key, _trained_row(label, path, tokens, f))
            rows.extend(store.trained(label))
            bar.update(1)
        bar.close()
    dense = rows[0]
    for row in rows:
        for name in tokens:
            row[f"increase_percent_{name}"] = 100 * (row[f"perplexity_{name}"] / dense[f"perplexity_{name}"] - 1)
    summary = {"model": model.config.name, "tokens_per_corpus": f.tokens, "context": f.context, "rows": rows}
    atomic_write_json(run_dir / "summary.json", to_jsonable(summary))
    if cfg.record_as:
        write_frontier_result(cfg, rows, command)
    return summary


COLUMNS = ("method", "target", "sparsity_web", "sparsity_pydocs", "perplexity_web", "perplexity_pydocs",
           "increase_percent_web", "increase_percent_pydocs")


def _row_name(row: dict[str, Any]) -> str:
    return f"{row['method']} ({row['trained_tokens']:,} tokens)" if row.get("trained_tokens") else row["method"]


def write_frontier_result(cfg: FrontierRunConfig, rows: list[dict[str, Any]], command: str) -> Path:
    f = cfg.frontier
    table = [[row.get(c, math.nan) for c in COLUMNS] for row in rows]
    metrics: dict[str, Any] = {"tokens_per_corpus": f.tokens, "context": f.context,
                               "dense_perplexity_web": rows[0]["perplexity_web"],
                               "dense_perplexity_pydocs": rows[0]["perplexity_pydocs"]}
    for row in rows[1:]:
        label = (f"{row['method']}_{row['trained_tokens']}" if math.isnan(row["target"])
                 else f"{row['method']}_{round(100 * row['target'])}")
        metrics[f"{label}_increase_web"] = row["increase_percent_web"]
        metrics[f"{label}_increase_pydocs"] = row["increase_percent_pydocs"]
    trained = [[_row_name(row), row.get("activation"), row.get("trained_tokens"), row.get("tokens_per_s", math.nan),
                row.get("mfu", math.nan), row["command"]] for row in rows if math.isnan(row["target"])]
    tables = [{"title": "Perplexity against FFN sparsity (same tokens and context for every row)",
               "columns": list(COLUMNS), "rows": table}]
    sampled = [row for row in rows if row.get("samples")]
    if sampled:
        tables.append({"title": "Greedy samples", "columns": ["row", "prompt", "continuation"],
                       "rows": [[_row_name(row), prompt, sample] for row in sampled
                                for prompt, sample in zip(f.prompts, row["samples"], strict=False)]})
    curves = {row["method"]: training_curve(row["run_dir"]) for row in rows if row.get("run_dir")}
    for label, curve in curves.items():
        if curve:
            tables.append({"title": f"Training curve of {label}", "columns": [
                "tokens", "val_perplexity_web", "val_perplexity_pydocs", "sparsity"], "rows": curve})
    if trained:
        tables.append({"title": "Trained rows: how each was made", "columns": ["row", "activation", "tokens trained",
                                                                                 "train tokens/s", "mfu", "command"],
                       "rows": trained})
    notes = (
        f"Every row is scored on the first {f.tokens:,} tokens of the WEB and Python-docs validation splits, windows "
        f"of {f.context}. Sparsity is measured on {f.sparsity_windows} of those windows per corpus: the share of FFN "
        "hidden values the rule drops (training-free rows; the original SwiGLU has no exact zeros) or that are "
        "exactly zero (trained rows). Training-free thresholds are calibrated per layer on "
        f"{f.calibration_tokens:,} training-split tokens of each corpus (stat_topk needs none: its cutoff is "
        "mean + z std of each token's gate pre-activations, z = Phi^-1(target)). teal_greedy spreads the target over "
        "layers where each layer's measured loss increase (that layer alone sparsified, on "
        f"{LOSS_WINDOWS} calibration windows per corpus) grows least; teal_greedy_output does the same on each "
        "layer's FFN-output squared error; teal uses the same target in every layer. A trained "
        "row is its run's latest checkpoint when the frontier ran (`tokens trained`); its training curve is the "
        "run's own validation (rows of its sequence length), for the slope. Train tokens/s: the median over the run's "
        "logged steps (lower when other jobs shared the 2 cores); mfu: those tokens/s times the model FLOPs per token "
        "(6 N, plus 2 N for a distillation teacher's forward) over the f32 matmul peak the run measured at its start."
    )
    return write_result(cfg.record_as, metrics, command=command, notes=notes, tables=tables,
                        title=f"Perplexity-sparsity frontier of {rows[0].get('model', cfg.model.preset)}",
                        results_dir=cfg.results_dir)
