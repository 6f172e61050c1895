"""The evaluation task: perplexity of a model on a corpus split, plus a sample generation."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from sparse_lm.data import DataConfig, EmptyCorpusError, split_tokens
from sparse_lm.eval.generate import Generator, SamplingConfig, prompt_bucket
from sparse_lm.eval.perplexity import perplexity
from sparse_lm.models.loading import ModelSpec, build_model
from sparse_lm.results import current_command, write_result
from sparse_lm.tracking import TrackerConfig, make_tracker
from sparse_lm.tracking.base import to_jsonable
from sparse_lm.utils.io import atomic_write_json

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Perplexity window and generation settings.

    Attributes:
      context: tokens per perplexity window; stride: window step (None = context).
      max_tokens: score only the first max_tokens of the split (None = all of it).
    """

    context: int = 512
    stride: int | None = None
    batch_size: int = 4
    max_tokens: int | None = None
    generate: bool = True
    prompt: str = "The capital of France is"
    max_new_tokens: int = 32
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.sampling, dict):
            object.__setattr__(self, "sampling", SamplingConfig(**self.sampling))
        if self.context < 2:
            raise ValueError(f"eval.context must be >= 2, got {self.context}")
        if self.stride is not None and not 1 <= self.stride <= self.context:
            raise ValueError(f"eval.stride must be in [1, eval.context={self.context}], got {self.stride}")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(f"eval.max_tokens must be >= 2 or null, got {self.max_tokens}")
        if self.max_new_tokens < 1:
            raise ValueError(f"eval.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.generate and not self.prompt:
            raise ValueError("eval.prompt must be non-empty when eval.generate is true")


@dataclasses.dataclass(frozen=True)
class EvalRunConfig:
    """Everything `experiments/eval.py` composes (schema of `conf/config.yaml`)."""

    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    tracker: TrackerConfig = dataclasses.field(default_factory=TrackerConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    record_as: str | None = None  # also write results/<record_as>.json (rendered into docs/RESULTS.md)
    results_dir: str = "results"


def write_run_files(run_dir: Path, config: Any, summary: dict[str, Any]) -> None:
    """The resolved config and the flat summary, written atomically into the run directory."""
    atomic_write_json(run_dir / CONFIG_FILE, to_jsonable(config))
    atomic_write_json(run_dir / SUMMARY_FILE, to_jsonable(summary))


def run(cfg: EvalRunConfig, run_dir: str | Path) -> dict[str, Any]:
    """Scores the configured split, generates a sample, writes summary.json; returns the summary."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / CONFIG_FILE, to_jsonable(cfg))
    tracker = make_tracker(cfg.tracker, run_dir, run_config=to_jsonable(cfg), run_name=run_dir.name)
    with tracker:
        model, tokenizer = build_model(cfg.model)
        tokens = split_tokens(cfg.data, tokenizer, progress=cfg.eval.progress)
        if cfg.eval.max_tokens is not None:
            tokens = tokens[: cfg.eval.max_tokens]
        if len(tokens) < 2:
            raise EmptyCorpusError(
                f"data.corpus={cfg.data.corpus.value} split={cfg.data.split.value} has {len(tokens)} token(s); "
                "need at least 2 to score"
            )
        ppl = perplexity(
            model, tokens, context=cfg.eval.context, stride=cfg.eval.stride, batch_size=cfg.eval.batch_size,
            progress=cfg.eval.progress,
        )
        summary: dict[str, Any] = {
            "model": model.config.name,
            "corpus": cfg.data.corpus.value,
            "split": cfg.data.split.value,
            "context": cfg.eval.context,
            "stride": cfg.eval.stride or cfg.eval.context,
            "nll": ppl.nll,
            "perplexity": ppl.perplexity,
            "scored_tokens": ppl.n_scored,
            "windows": ppl.n_windows,
            "eval_tokens_per_s": ppl.tokens_per_s,
        }
        if cfg.eval.generate:
            prompt = tokenizer.encode(cfg.eval.prompt)
            capacity = prompt_bucket(len(prompt)) + cfg.eval.max_new_tokens
            generator = Generator(model, capacity=capacity, sampling=cfg.eval.sampling)
            result = generator.generate(prompt, cfg.eval.max_new_tokens, stop_token=tokenizer.eos_token_id)
            summary.update(
                prompt=cfg.eval.prompt,
                sample=tokenizer.decode(result.tokens, skip_special_tokens=True),
                prefill_tokens_per_s=result.prefill_tokens_per_s,
                decode_tokens_per_s=result.decode_tokens_per_s,
                generated_tokens=len(result.tokens),
            )
        tracker.log_summary(summary)
        atomic_write_json(run_dir / SUMMARY_FILE, to_jsonable(summary))
    if cfg.record_as:
        # Speeds are left out: a perplexity run is no benchmark (experiments/bench_decode.py is).
        write_result(
            cfg.record_as,
            {key: value for key, value in summary.items() if not key.endswith("_per_s")},
            command=current_command(),
            title=f"Perplexity of {summary['model']} on {summary['corpus']}/{summary['split']} "
            f"(context {summary['context']})",
            notes="Mean NLL over every predicted token of the split (windows of `context` tokens, each "
            "scoring only tokens no earlier window scored); perplexity = exp(nll). f32 on CPU.",
            results_dir=cfg.results_dir,
        )
    return summary
