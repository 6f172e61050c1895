"""The train task end to end on a tiny model: history, summary, result, checkpoints, resume, NaN guard."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from sparse_lm.models.loading import ModelSpec, build_model
from sparse_lm.train.checkpoint import Checkpointer, CheckpointMismatchError
from sparse_lm.train.run import TrainingDivergedError, run
from tests.train.conftest import ROOT, tiny_run_config


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def test_run_writes_history_summary_checkpoints_and_result(text_file, tmp_path):
    cfg = dataclasses.replace(tiny_run_config(text_file, tmp_path), record_as="tiny_train")
    summary = run(cfg, tmp_path / "run")
    history = _history(tmp_path / "run")
    train = [r for r in history if r["kind"] == "train"]
    evals = [r for r in history if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert train[-1]["loss"] < train[0]["loss"]  # it learns
    assert summary["tokens"] == 6 * 4 * 32 and summary["devices"] == 1
    assert summary["val_perplexity"] == pytest.approx(evals[-1]["val_perplexity"])
    assert summary["start_val_perplexity"] == pytest.approx(evals[0]["val_perplexity"])
    assert 0 < summary["sparsity"] < 1  # dReLU gives exact zeros
    assert summary["perplexity_top90"] > summary["val_perplexity"] * 0.9
    assert Checkpointer(tmp_path / "run", keep=2).all_steps() == [4, 6]
    result = json.loads((tmp_path / "results" / "tiny_train.json").read_text())
    assert result["metrics"]["after_val_perplexity"] == pytest.approx(summary["val_perplexity"])
    assert len(result["series"]["train"]["rows"]) == 6
    # the trained model loads by path, with the parameters of the last step
    model, tokenizer = build_model(ModelSpec(source="checkpoint", path=str(tmp_path / "run")))
    assert model.config.activation.value == "drelu" and tokenizer.vocab_size == 257
    state, _ = Checkpointer(tmp_path / "run", keep=2, read_only=True).restore(_template(cfg))
    np.testing.assert_array_equal(model.blocks[1].ffn.w_down[...], state.params["blocks"][1]["ffn"]["w_down"][...])
    # device arrays, not numpy ones a jitted step would copy to the device on every call
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _template(cfg):
    from sparse_lm.train.optim import make_optimizer
    from sparse_lm.train.step import init_state, split_model

    model, _ = build_model(cfg.model)
    _, params, _ = split_model(model)
    return init_state(params, make_optimizer(cfg.optim, cfg.train.steps), cfg.train.seed)


def test_checkpoint_of_another_model_is_refused_by_name(text_file, tmp_path):
    cfg = tiny_run_config(text_file, tmp_path, steps=2)
    run(cfg, tmp_path / "run")
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, activation="relu"))
    with pytest.raises(CheckpointMismatchError, match="w_gate"):
        Checkpointer(tmp_path / "run", keep=2).restore(_template(other))
    with pytest.raises(ValueError, match=r"model\.activation"):
        run(other, tmp_path / "run")


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(text_file, tmp_path):
    cfg = tiny_run_config(text_file, tmp_path, steps=8, nan_at_step=4)
    with pytest.raises(TrainingDivergedError, match=r"step 5: loss nan.*Last good checkpoint: step 4"):
        run(cfg, tmp_path / "run")
    checkpointer = Checkpointer(tmp_path / "run", keep=2)
    assert checkpointer.all_steps() == [2, 4]
    state, meta = checkpointer.restore(_template(cfg))
    assert meta["data_batch"] == 4 and int(state.step) == 4
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))
    assert not (tmp_path / "run" / "summary.json").exists()


def test_partial_checkpoint_folder_is_removed_on_resume(text_file, tmp_path):
    cfg = tiny_run_config(text_file, tmp_path, steps=4)
    with pytest.raises(TrainingDivergedError):
        run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, nan_at_step=3)), tmp_path / "run")
    # a save killed half-way leaves a temporary folder like this one
    partial = tmp_path / "run" / "checkpoints" / "4.orbax-checkpoint-tmp-1234"
    partial.mkdir()
    (partial / "junk").write_bytes(b"\0" * 10)
    summary = run(cfg, tmp_path / "run")
    assert not partial.exists()
    assert summary["steps"] == 4 and Checkpointer(tmp_path / "run", keep=2).all_steps() == [2, 4]


def _train_command(text_file: Path, tmp_path: Path, run_dir: Path, steps: int) -> list[str]:
    return [
        sys.executable, str(ROOT / "experiments" / "train.py"), "model=tiny", "model.activation=drelu",
        "data=textfile", f"data.path={text_file}", "data.split=all", f"data.cache_dir={tmp_path / 'cache'}",
        f"train.steps={steps}", "train.batch_size=4", "train.seq_len=32", "train.log_every=1",
        "train.eval_every=100000", "train.checkpoint_every=10", "train.progress=false", "eval.tokens=256",
        "eval.topk_keep=[]", "tracker=noop", f"hydra.run.dir={run_dir}",
    ]


@pytest.mark.slow
def test_sigkill_mid_run_resumes_to_the_same_losses(text_file, tmp_path):
    steps = 400
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    reference = tmp_path / "reference"
    subprocess.run(_train_command(text_file, tmp_path, reference, steps), check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    process = subprocess.Popen(_train_command(text_file, tmp_path, killed, steps), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = killed / "history.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        lines = history.read_text().splitlines() if history.exists() else []
        if sum('"kind": "train"' in line for line in lines) >= 25:
            break
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    saved = Checkpointer(killed, keep=2, read_only=True).all_steps()
    assert saved and max(saved) < steps and not (killed / "summary.json").exists(), "the kill came too late"
    subprocess.run(_train_command(text_file, tmp_path, killed, steps), check=True, env=env, capture_output=True)
    losses = {r["step"]: r["loss"] for r in _history(reference) if r["kind"] == "train"}
    resumed = {r["step"]: r["loss"] for r in _history(killed) if r["kind"] == "train"}
    assert sorted(resumed) == list(range(1, steps + 1))
    next_step = max(saved) + 1
    assert resumed[next_step] == pytest.approx(losses[next_step], abs=1e-6)
    np.testing.assert_allclose([resumed[s] for s in range(1, steps + 1)],
                               [losses[s] for s in range(1, steps + 1)], atol=1e-6, rtol=0)


def test_cli_reports_divergence_clearly(text_file, tmp_path):
    command = _train_command(text_file, tmp_path, tmp_path / "run", 6) + ["train.nan_at_step=3"]
    result = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert result.returncode == 3
    assert "error: step 4: loss nan" in result.stderr and "Last good checkpoint" not in result.stderr.split("error:")[0]


SPMD_SCRIPT = """
import dataclasses, json, sys
import jax
assert jax.device_count() == 2, jax.devices()
from tests.train.conftest import tiny_run_config
from sparse_lm.train.run import run
from pathlib import Path
tmp = Path(sys.argv[1]); text = Path(sys.argv[2])
out = {}
for devices in (1, 2):
    cfg = tiny_run_config(text, tmp, steps=5, accum_steps=2, devices=devices)
    summary = run(cfg, tmp / f"run{devices}")
    history = [json.loads(l) for l in (tmp / f"run{devices}" / "history.jsonl").read_text().splitlines()]
    out[devices] = {"devices": summary["devices"], "losses": [r["loss"] for r in history if r["kind"] == "train"],
                    "val": summary["val_loss"]}
print(json.dumps(out))
"""


def test_data_parallel_on_two_devices_matches_one(text_file, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run([sys.executable, "-c", SPMD_SCRIPT, str(tmp_path), str(text_file)], env=env,
                            capture_output=True, text=True, check=True)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["1"]["devices"] == 1 and out["2"]["devices"] == 2
    assert len(out["1"]["losses"]) == 5
    np.testing.assert_allclose(out["2"]["losses"], out["1"]["losses"], atol=1e-5, rtol=0)
    assert out["2"]["val"] == pytest.approx(out["1"]["val"], abs=1e-5)
    assert not math.isclose(out["1"]["losses"][0], out["1"]["losses"][-1])  # the steps moved the model
