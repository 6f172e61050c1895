"""The train task: (continued) training of a model with checkpoints, resume, a NaN guard and evaluations.

A run directory holds config.json, model_config.json, tokenizer.json, checkpoints/, history.jsonl (one line
per logged step and per evaluation) and, when finished, summary.json. Running the same configuration in
the same directory resumes from the latest checkpoint and continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from sparse_lm.data import DataConfig, PackedSequences, batch_iterator, pack_sequences, split_tokens
from sparse_lm.data.bpe_train import corpus_tokenizer
from sparse_lm.models.capture import split_capturing
from sparse_lm.models.config import ThresholdTarget
from sparse_lm.models.ffn import CapturePoint
from sparse_lm.models.loading import WeightSource, build_model
from sparse_lm.models.transformer import Transformer, count_params
from sparse_lm.results import current_command
from sparse_lm.roofline.calibrate import measure_matmul_flops
from sparse_lm.tracking import make_tracker
from sparse_lm.tracking.base import to_jsonable
from sparse_lm.train.checkpoint import Checkpointer, read_model_config, save_run_metadata
from sparse_lm.train.config import TokenizerSource, Trainable, TrainRunConfig
from sparse_lm.train.evaluate import EvalResult, combine, evaluate, evaluate_top_k, model_from_state
from sparse_lm.train.optim import l1_coefficient, learning_rate_schedule, make_optimizer
from sparse_lm.train.parallel import check_divisible, data_mesh, micro_batch_sharding, replicated
from sparse_lm.train.report import write_train_result
from sparse_lm.train.step import Teacher, init_state, make_train_step, split_model
from sparse_lm.train.swap import calibrate_gate_thresholds, configure_swap, swapped_layers
from sparse_lm.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.jsonl"
SUMMARY_FILE = "summary.json"
# Keys that may change between a run and its resumption (they do not change what is computed).
RESUMABLE_CHANGES = ("train.progress", "tracker", "record_as", "results_dir", "train.nan_at_step")


class TrainingDivergedError(RuntimeError):
    """The loss or gradient became NaN/Inf; the run stopped without saving."""


def _flat(record: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(record, dict):
        out: dict[str, Any] = {}
        for key, value in record.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: record}


def check_resumable(run_dir: Path, cfg: TrainRunConfig) -> None:
    """A run directory with checkpoints must be resumed with the configuration that wrote them."""
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return
    saved, current = _flat(json.loads(path.read_text())), _flat(to_jsonable(cfg))
    changed = sorted(
        key for key in saved.keys() | current.keys()
        if saved.get(key) != current.get(key) and not key.startswith(RESUMABLE_CHANGES)
    )
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:5])
        raise ValueError(
            f"run directory {run_dir} holds checkpoints of a different configuration ({details}); "
            "resume with the same settings or choose a new run directory (hydra.run.dir=...)"
        )


def build_tokenizer_and_model(cfg: TrainRunConfig):
    """The model to train and its tokenizer (a trained BPE resizes the vocabulary of a random model)."""
    if cfg.tokenizer.source is TokenizerSource.train_bpe:
        if cfg.model.source is not WeightSource.random:
            raise ValueError("tokenizer.source=train_bpe needs model.source=random (pretrained weights fix the vocab)")
        tokenizer = corpus_tokenizer(cfg.train_corpora(), cfg.tokenizer.vocab_size)
        config = cfg.model.config().replace(
            vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
            max_seq_len=max(cfg.train.seq_len, cfg.model.config().max_seq_len),
        )
        return Transformer(config, rngs=nnx.Rngs(cfg.model.seed)), tokenizer
    model, tokenizer = build_model(cfg.model)
    return model, tokenizer


def original_model(cfg: TrainRunConfig) -> Transformer | None:
    """The pretrained model before its activation swap (teacher, calibration, baseline); None when nothing is
    swapped."""
    spec = cfg.model
    if spec.activation is None or cfg.tokenizer.source is TokenizerSource.train_bpe:
        return None
    if spec.source is WeightSource.random and not (cfg.distill.enabled or cfg.swap.stages > 1 or
                                                    cfg.swap.target_sparsity is not None):
        return None  # a random model's "original" is only needed as a teacher or for calibration
    original, _ = build_model(dataclasses.replace(spec, activation=None, ffn_thresholds=None, ffn_threshold_on=None))
    if original.config.activation is spec.activation and spec.ffn_thresholds is None and \
            cfg.swap.target_sparsity is None:
        return None
    return original


def swap_thresholds(cfg: TrainRunConfig, run_dir: Path, resuming: bool, original: Transformer,
                    train_rows: np.ndarray) -> tuple[float, ...]:
    """The calibrated gate thresholds: those saved with the run when resuming, else calibrated now."""
    if resuming:
        saved = read_model_config(run_dir).ffn_thresholds
        if saved is not None:
            return saved
    return calibrate_gate_thresholds(original, train_rows, cfg.model.activation, cfg.swap, cfg.eval.batch_size)


def token_rows(corpora: list[DataConfig], tokenizer, seq_len: int, limit: int | None, progress: bool) -> np.ndarray:
    """Each corpus's stream (up to `limit` tokens) packed into rows of seq_len, corpora concatenated."""
    rows = []
    for data in corpora:
        tokens = split_tokens(data, tokenizer, progress=progress)
        if limit is not None:
            tokens = tokens[: max(limit, seq_len)]
        rows.append(pack_sequences(tokens, seq_len).tokens)
    return np.concatenate(rows)


class History:
    """history.jsonl: appended as the run goes; on resume, lines after the restored step are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        kept = []
        if path.exists() and resume_step > 0:
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by a kill: everything after it is gone anyway
                if record["step"] <= resume_step:
                    kept.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(to_jsonable(record)) + "\n")

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _eval_record(kind: str, step: int, tokens: int, result: EvalResult, per_corpus: dict[str, float]) -> dict:
    return {
        "kind": kind, "step": step, "tokens": tokens, "val_loss": result.nll, "val_perplexity": result.perplexity,
        "sparsity": result.sparsity, "sparsity_per_layer": list(result.zero_fraction), **per_corpus,
    }


def run(cfg: TrainRunConfig, run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t = cfg.train
    checkpointer = Checkpointer(run_dir, keep=t.keep_checkpoints)
    if checkpointer.latest_step() is not None:
        check_resumable(run_dir, cfg)
    atomic_write_json(run_dir / CONFIG_FILE, to_jsonable(cfg))
    model, tokenizer = build_tokenizer_and_model(cfg)
    train_rows = token_rows(cfg.train_corpora(), tokenizer, t.seq_len, None, t.progress)
    original = original_model(cfg)
    if cfg.swap.target_sparsity is not None:
        thresholds = swap_thresholds(cfg, run_dir, checkpointer.latest_step() is not None, original, train_rows)
        model, _ = build_model(dataclasses.replace(cfg.model, ffn_thresholds=thresholds,
                                                   ffn_threshold_on=ThresholdTarget.gate))
    save_run_metadata(run_dir, model.config, tokenizer)
    val_sets = {
        data.corpus.value: token_rows([data], tokenizer, t.seq_len, cfg.eval.tokens, t.progress)
        for data in cfg.validation_corpora()
    }
    val_rows = np.concatenate(list(val_sets.values()))  # for the final top-k evaluation

    mesh = data_mesh(t.devices)
    micro_rows = t.batch_size // t.accum_steps
    check_divisible(micro_rows, mesh)
    tx = make_optimizer(cfg.optim, t.steps)
    lr_at = learning_rate_schedule(cfg.optim, t.steps)
    ffn_only = t.trainable is Trainable.ffn
    d = cfg.distill
    points = (CapturePoint.ffn_hidden,) + ((CapturePoint.ffn_output,) if d.ffn_weight > 0 else ())
    graphdef, params, rest = split_model(model, points)
    state = init_state(params, tx, t.seed, ffn_only)
    start = checkpointer.latest_step() or 0
    if start:
        state, meta = checkpointer.restore(state)
        log.info("resumed %s at step %d (batch %d)", run_dir, start, meta["data_batch"])
    state = jax.device_put(state, replicated(mesh))
    teacher = None
    if d.enabled:
        teacher_points = (CapturePoint.ffn_output,) if d.ffn_weight > 0 else ()
        teacher = Teacher(*split_capturing(original, teacher_points))
        teacher = Teacher(teacher.graphdef, jax.device_put(teacher.state, replicated(mesh)))

    def build_step(swapped: np.ndarray):
        """The graph and jitted step for the layers swapped so far (a staged swap rebuilds them per stage)."""
        if original is not None and cfg.swap.stages > 1:
            configure_swap(model, swapped, original.config.activation)
        graph, _, non_params = split_model(model, points)
        step_function = make_train_step(
            graph, non_params, tx, model.config, teacher=teacher, kl_weight=d.kl_weight, ce_weight=d.ce_weight,
            temperature=d.temperature, ffn_weight=d.ffn_weight, trainable_ffn_only=ffn_only,
        )
        return graph, non_params, step_function

    swapped = swapped_layers(cfg.swap, model.config.n_layers, start)
    graphdef, rest, step_fn = build_step(swapped)
    batch_sharding = micro_batch_sharding(mesh)
    history = History(run_dir / HISTORY_FILE, start)
    tracker = make_tracker(cfg.tracker, run_dir, run_config=to_jsonable(cfg), run_name=cfg.name)
    n_params = count_params(model)
    # Model FLOPs per trained token: 6 N for the student's forward and backward, 2 N for the teacher's forward.
    flops_per_token = 6 * n_params + (2 * count_params(original) if teacher is not None else 0)
    matmul_peak = measure_matmul_flops()  # this machine's f32 matmul peak now, for the MFU
    # kept in the history too, so an unfinished run's MFU can be read (frontier rows of a running training)
    history.append({"kind": "throughput", "step": start, "tokens": start * t.tokens_per_step, "devices": mesh.size,
                    "flops_per_token": flops_per_token, "matmul_peak_gflops": matmul_peak / 1e9})

    def evaluate_now(step: int) -> EvalResult:
        current = model_from_state(graphdef, state.params, rest)
        parts = {name: evaluate(current, rows, cfg.eval.batch_size) for name, rows in val_sets.items()}
        result = combine(list(parts.values()))
        per_corpus = {}
        if len(parts) > 1:
            per_corpus = {f"val_perplexity_{name}": part.perplexity for name, part in parts.items()}
        record = _eval_record("eval", step, step * t.tokens_per_step, result, per_corpus)
        history.append(record)
        tracker.log({k: v for k, v in record.items() if k not in ("kind", "step", "sparsity_per_layer")}, step=step)
        return result

    with tracker:
        if start == 0:
            baseline_eval(original, cfg, val_sets, history)
            evaluate_now(0)
        batches = batch_iterator(
            PackedSequences(train_rows, np.ones(train_rows.shape, bool)), t.batch_size, shuffle=True, seed=t.seed,
            start_batch=start, num_epochs=None,
        )
        bar = tqdm(total=t.steps, initial=start, desc=f"train {cfg.name}", unit="step", disable=not t.progress)
        window_seconds, window_steps, train_seconds = 0.0, 0, 0.0
        for step in range(start, t.steps):
            now_swapped = swapped_layers(cfg.swap, model.config.n_layers, step)
            if len(now_swapped) != len(swapped):
                swapped = now_swapped
                graphdef, rest, step_fn = build_step(swapped)
                log.info("step %d: %d of %d layers swapped", step, len(swapped), model.config.n_layers)
            batch = next(batches)
            shape = (t.accum_steps, micro_rows, t.seq_len)
            tokens = jax.device_put(batch.tokens.reshape(shape), batch_sharding)
            mask = jax.device_put(batch.mask.reshape(shape), batch_sharding)
            poison = jnp.float32(math.nan if step == t.nan_at_step else 1.0)
            coefficient = jnp.float32(l1_coefficient(cfg.l1, step))
            step_start = time.perf_counter()
            state, metrics = step_fn(state, tokens, mask, coefficient, poison)
            loss, grad_norm = float(metrics.loss), float(metrics.grad_norm)
            step_seconds = time.perf_counter() - step_start
            train_seconds += step_seconds
            window_seconds += step_seconds
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                last = checkpointer.latest_step()
                checkpointer.close()
                raise TrainingDivergedError(
                    f"step {step + 1}: loss {loss} / gradient norm {grad_norm} is not finite; stopped without "
                    f"saving. Last good checkpoint: step {last} in {checkpointer.directory}"
                    if last is not None else
                    f"step {step + 1}: loss {loss} / gradient norm {grad_norm} is not finite; stopped before the "
                    "first checkpoint"
                )
            window_steps += 1
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if done % t.log_every == 0 or done == t.steps:
                zero_fraction = np.asarray(metrics.zero_fraction)
                record = {
                    "kind": "train", "step": done, "tokens": done * t.tokens_per_step, "loss": loss,
                    "l1": float(metrics.l1), "l1_coefficient": float(coefficient), "grad_norm": grad_norm,
                    "lr": float(lr_at(step)), "tokens_per_s": window_steps * t.tokens_per_step / window_seconds,
                    "sparsity": float(zero_fraction.mean()), "kl": float(metrics.kl),
                    "ffn_match": float(metrics.ffn_match), "swapped_layers": len(swapped),
                }
                history.append({**record, "sparsity_per_layer": zero_fraction.tolist()})
                tracker.log(
                    {**{k: v for k, v in record.items() if k not in ("kind", "step")},
                     **{f"sparsity/layer_{i:02d}": float(z) for i, z in enumerate(zero_fraction)}},
                    step=done,
                )
                window_seconds, window_steps = 0.0, 0
            if done % t.checkpoint_every == 0 or done == t.steps:
                checkpointer.save(done, state, {"data_batch": done, "tokens_seen": done * t.tokens_per_step})
            if done % t.eval_every == 0 or done == t.steps:
                evaluate_now(done)
        bar.close()
        checkpointer.close()
        throughput = {"devices": mesh.size, "flops_per_token": flops_per_token,
                      "matmul_peak_gflops": max(matmul_peak, measure_matmul_flops()) / 1e9}
        summary = finish(cfg, run_dir, model_from_state(graphdef, state.params, rest), val_rows, history,
                         n_params, train_seconds, throughput)
        tracker.log_summary(summary)
    return summary


def baseline_eval(
    original: Transformer | None, cfg: TrainRunConfig, val_sets: dict[str, np.ndarray], history: History
) -> None:
    """For a pretrained model whose activation was swapped: the original model's loss and sparsity, over all the
    validation rows and per corpus."""
    if original is None:
        return
    parts = {name: evaluate(original, rows, cfg.eval.batch_size) for name, rows in val_sets.items()}
    per_corpus = {f"val_perplexity_{name}": part.perplexity for name, part in parts.items()} if len(parts) > 1 else {}
    result = combine(list(parts.values()))
    history.append({**_eval_record("baseline", 0, 0, result, per_corpus),
                    "activation": original.config.activation.value})


def finish(
    cfg: TrainRunConfig, run_dir: Path, model: Transformer, val_rows: np.ndarray, history: History,
    n_params: int, train_seconds: float, throughput: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Final evaluations (incl. forced top-k), summary.json and the optional result record."""
    records = history.records()
    final = next(r for r in reversed(records) if r["kind"] == "eval")
    summary: dict[str, Any] = {
        "name": cfg.name,
        "activation": model.config.activation.value,
        "params": n_params,
        "steps": cfg.train.steps,
        "tokens": cfg.train.steps * cfg.train.tokens_per_step,
        "val_perplexity": final["val_perplexity"],
        "val_loss": final["val_loss"],
        "sparsity": final["sparsity"],
        "sparsity_per_layer": final["sparsity_per_layer"],
        **{k: v for k, v in final.items() if k.startswith("val_perplexity_")},
        "train_seconds_this_invocation": train_seconds,
        "recipe": {
            "kl_weight": cfg.distill.kl_weight, "ce_weight": cfg.distill.ce_weight,
            "ffn_weight": cfg.distill.ffn_weight, "trainable": cfg.train.trainable.value,
            "swap_stages": cfg.swap.stages, "lr": cfg.optim.lr,
        },
    }
    if model.config.ffn_thresholds is not None:
        summary["ffn_thresholds"] = list(model.config.ffn_thresholds)
        summary["ffn_threshold_on"] = model.config.ffn_threshold_on.value
    for keep in cfg.eval.topk_keep:
        result = evaluate_top_k(model, val_rows, cfg.eval.batch_size, keep)
        summary[f"perplexity_top{round((1 - keep) * 100)}"] = result.perplexity
    steps = [r for r in records if r["kind"] == "train"]
    if steps:
        summary["tokens_per_s"] = float(np.median([r["tokens_per_s"] for r in steps]))
    summary.update(throughput or {})
    if steps and throughput:
        # model FLOP utilisation against the f32 matmul peak measured in this run
        summary["mfu"] = summary["tokens_per_s"] * throughput["flops_per_token"] / (
            throughput["matmul_peak_gflops"] * 1e9 * throughput["devices"])
    first = next((r for r in records if r["kind"] == "eval" and r["step"] == 0), None)
    if first is not None:
        summary["start_val_perplexity"], summary["start_sparsity"] = first["val_perplexity"], first["sparsity"]
    baseline = next((r for r in records if r["kind"] == "baseline"), None)
    if baseline is not None:
        summary["baseline_activation"] = baseline["activation"]
        summary["baseline_val_perplexity"], summary["baseline_sparsity"] = (
            baseline["val_perplexity"], baseline["sparsity"]
        )
        for key in [k for k in baseline if k.startswith("val_perplexity_")]:
            summary[f"baseline_{key}"] = baseline[key]
    summary["command"] = current_command()
    atomic_write_json(run_dir / SUMMARY_FILE, summary)
    if cfg.record_as:
        write_train_result(cfg, summary, records)
    return summary
