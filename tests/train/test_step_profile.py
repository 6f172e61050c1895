"""The training-step profile on a tiny distilled run: every part timed, XLA's FLOP counts consistent, a record."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sparse_lm.train.config import DistillConfig, SwapConfig
from sparse_lm.train.step_profile import run
from tests.train.conftest import tiny_run_config


def test_parts_are_timed_and_counted(text_file, tmp_path):
    cfg = tiny_run_config(text_file, tmp_path)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, activation="reglu"),
                              distill=DistillConfig(kl_weight=1.0, ffn_weight=0.5),
                              swap=SwapConfig(target_sparsity=0.7, calibration_tokens=256))
    summary = run(cfg, str(tmp_path / "run"))
    parts = {p["part"]: p for p in summary["parts"]}
    assert list(parts) == ["step", "teacher_forward", "student_forward", "student_grad"]
    assert summary["teacher"] and summary["tokens_per_step"] == 4 * 32
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens_per_step"] / (parts["step"]["ms"] / 1e3))
    assert parts["step"]["share_of_step"] == 1.0 and all(p["ms"] > 0 for p in parts.values())
    forward = parts["student_forward"]["xla_gflop"]
    # same architecture, same tokens: the teacher's forward costs what the student's does; a gradient ~3 forwards;
    # the step holds a student gradient and a teacher forward
    assert parts["teacher_forward"]["xla_gflop"] == pytest.approx(forward, rel=0.2)
    assert 2 < parts["student_grad"]["xla_gflop"] / forward < 4
    assert parts["step"]["xla_gflop"] > parts["student_grad"]["xla_gflop"] + 0.8 * forward
    # model FLOPs: 6 N per token for the student plus 2 N for the teacher
    assert summary["model_flops_per_step"] == 8 * summary["params"] * summary["tokens_per_step"]
    record = json.loads((tmp_path / "results" / "train_step_tiny.json").read_text())
    assert [r[0] for r in record["tables"][0]["rows"]] == list(parts)
    assert record["metrics"]["mfu"] == pytest.approx(summary["mfu"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["parts"] == summary["parts"]
