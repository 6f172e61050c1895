"""Where a training step's time goes: the jitted step of a run configuration against its parts, each compiled
alone and timed side by side on the same batch (interleaved repeats, medians), with XLA's FLOP count of each
part, the model FLOPs and the f32 matmul peak measured in the same run.

Parts: `step` (the whole update, as `train.run` runs it), `teacher_forward` (the distillation teacher's logits
and captured FFN outputs), `student_forward` (the student's logits and next-token loss), `student_grad` (the
gradient of that loss alone, no teacher). The step is not the sum of its parts (the step's loss adds KL and
FFN matching, and the optimiser update), but their shares show where a faster step must come from.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparse_lm.models.capture import split_capturing
from sparse_lm.models.config import ThresholdTarget
from sparse_lm.models.ffn import CapturePoint
from sparse_lm.models.loading import build_model
from sparse_lm.models.transformer import count_params
from sparse_lm.results import current_command, write_result
from sparse_lm.roofline.calibrate import measure_matmul_flops
from sparse_lm.tracking.base import to_jsonable
from sparse_lm.train.config import Trainable, TrainRunConfig
from sparse_lm.train.optim import make_optimizer
from sparse_lm.train.run import build_tokenizer_and_model, original_model, token_rows
from sparse_lm.train.step import Teacher, forward_captured, init_state, make_train_step, split_model
from sparse_lm.train.swap import calibrate_gate_thresholds
from sparse_lm.utils.io import atomic_write_json

PARTS = ("step", "teacher_forward", "student_forward", "student_grad")


def _xla_flops(jitted, *args) -> float:
    """FLOPs of one call as XLA's cost analysis counts them (nan where the backend gives none)."""
    analysis = jitted.lower(*args).compile().cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per program
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", float("nan")))


def profile_train_step(cfg: TrainRunConfig, repeats: int = 5, calibration_tokens: int = 4096) -> dict[str, Any]:
    """Median seconds, XLA FLOPs and achieved GFLOP/s of each part of `cfg`'s training step on one batch of its
    training data (every layer swapped; thresholds calibrated on `calibration_tokens` training tokens)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    t, d = cfg.train, cfg.distill
    model, tokenizer = build_tokenizer_and_model(cfg)
    rows = token_rows(cfg.train_corpora()[:1], tokenizer, t.seq_len, max(t.tokens_per_step, calibration_tokens),
                      progress=False)
    original = original_model(cfg)
    if cfg.swap.target_sparsity is not None:
        swap = dataclasses.replace(cfg.swap, calibration_tokens=calibration_tokens)
        thresholds = calibrate_gate_thresholds(original, rows, cfg.model.activation, swap, cfg.eval.batch_size)
        model, _ = build_model(dataclasses.replace(cfg.model, ffn_thresholds=thresholds,
                                                   ffn_threshold_on=ThresholdTarget.gate))
    points = (CapturePoint.ffn_hidden,) + ((CapturePoint.ffn_output,) if d.ffn_weight > 0 else ())
    graphdef, params, rest = split_model(model, points)
    tx = make_optimizer(cfg.optim, t.steps)
    ffn_only = t.trainable is Trainable.ffn
    state = init_state(params, tx, t.seed, ffn_only)
    teacher = None
    if d.enabled:
        teacher = Teacher(*split_capturing(original, (CapturePoint.ffn_output,) if d.ffn_weight > 0 else ()))
    step = make_train_step(graphdef, rest, tx, model.config, teacher=teacher, kl_weight=d.kl_weight,
                           ce_weight=d.ce_weight, temperature=d.temperature, ffn_weight=d.ffn_weight,
                           trainable_ffn_only=ffn_only)
    batch = jnp.asarray(rows[: t.batch_size])
    tokens = batch.reshape(t.accum_steps, t.batch_size // t.accum_steps, t.seq_len)
    mask = jnp.ones(tokens.shape, bool)
    scalars = (jnp.float32(0.0), jnp.float32(1.0))

    def student_loss(params, batch):
        logits, _ = forward_captured(graphdef, batch[:, :-1], params, rest)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch[:, 1:]))

    own = jax.tree.map(jnp.copy, state.params)  # the step donates its state: the parts keep their own copy
    parts: dict[str, Any] = {
        "student_forward": (jax.jit(student_loss), (own, batch)),
        "student_grad": (jax.jit(jax.grad(student_loss)), (own, batch)),
    }
    if teacher is not None:
        parts["teacher_forward"] = (jax.jit(lambda s, b: forward_captured(teacher.graphdef, b[:, :-1], s)),
                                    (teacher.state, batch))
    flops = {name: _xla_flops(fn, *args) for name, (fn, args) in parts.items()}
    flops["step"] = _xla_flops(step, state, tokens, mask, *scalars)
    peak = measure_matmul_flops()
    seconds: dict[str, list[float]] = {name: [] for name in ("step", *parts)}
    for fn, args in parts.values():
        jax.block_until_ready(fn(*args))  # compile outside the timing
    state, _ = step(state, tokens, mask, *scalars)
    jax.block_until_ready(state)
    for _ in range(repeats):
        for name, (fn, args) in parts.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            seconds[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        state, metrics = step(state, tokens, mask, *scalars)
        jax.block_until_ready(metrics)
        seconds["step"].append(time.perf_counter() - start)
    peak = max(peak, measure_matmul_flops())
    n_student = count_params(model)
    model_flops = 6 * n_student * t.tokens_per_step
    if teacher is not None:
        model_flops += 2 * count_params(original) * t.tokens_per_step
    median = {name: float(np.median(s)) for name, s in seconds.items()}
    table = []
    for name in PARTS:
        if name not in median:
            continue
        achieved = flops[name] / median[name]
        table.append({"part": name, "ms": 1e3 * median[name], "share_of_step": median[name] / median["step"],
                      "xla_gflop": flops[name] / 1e9, "gflop_per_s": achieved / 1e9, "of_matmul_peak": achieved / peak})
    return {
        "batch_size": t.batch_size, "seq_len": t.seq_len, "tokens_per_step": t.tokens_per_step,
        "params": n_student, "teacher": teacher is not None, "repeats": repeats,
        "matmul_peak_gflops": peak / 1e9, "model_flops_per_step": model_flops,
        "tokens_per_s": t.tokens_per_step / median["step"], "mfu": model_flops / median["step"] / peak,
        "parts": table,
    }


def run(cfg: TrainRunConfig, run_dir: str | Path) -> dict[str, Any]:
    """Profiles `cfg`'s step, writes summary.json and config.json in `run_dir` and the record
    `train_step_<cfg.name>` (never the training run's own record)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", to_jsonable(cfg))
    summary = {"name": cfg.name, **profile_train_step(cfg)}
    atomic_write_json(run_dir / "summary.json", summary)
    columns = ["part", "ms", "share_of_step", "xla_gflop", "gflop_per_s", "of_matmul_peak"]
    metrics = {k: summary[k] for k in ("tokens_per_step", "tokens_per_s", "mfu", "matmul_peak_gflops")}
    metrics.update({f"{p['part']}_ms": p["ms"] for p in summary["parts"]})
    write_result(
        f"train_step_{cfg.name}", metrics, command=current_command(), results_dir=cfg.results_dir,
        title=f"Where a training step of {cfg.name} goes",
        tables=[{"title": "Parts of one step, timed side by side on one batch", "columns": columns,
                 "rows": [[p[c] for c in columns] for p in summary["parts"]]}],
        notes=(f"One batch of {summary['batch_size']} x {summary['seq_len']} tokens, {summary['repeats']} interleaved "
               "repeats per part, medians. step: the whole jitted update (loss, gradient, optimiser); "
               "teacher_forward: the distillation teacher's logits and FFN outputs; student_forward / student_grad: "
               "the student's next-token loss and its gradient alone. xla_gflop: FLOPs by XLA's cost analysis; "
               "of_matmul_peak: achieved FLOP/s over the f32 matmul peak measured in the run. mfu: model FLOPs (6 N "
               "per token, plus 2 N for a teacher) per step time over that peak. Run alone: other jobs on the 2 "
               "cores lower every number."),
    )
    return summary
