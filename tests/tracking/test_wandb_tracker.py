"""WandbTracker without a network (disabled and offline modes), and wandb staying out of the import path."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sparse_lm.tracking import CompositeTracker, TrackerConfig, WandbMode, make_tracker, read_metrics

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Keeps W&B quiet, offline and inside tmp_path (no ~/.config/wandb, no artifact cache in ~)."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def test_importing_tracking_does_not_import_wandb():
    # A fresh interpreter: this test process may already have imported wandb for other tests.
    code = "import sys, sparse_lm.tracking; print('wandb' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_disabled_mode_logs_and_writes_jsonl(wandb_env):
    run_dir = wandb_env / "run"
    cfg = TrackerConfig(kind="wandb", mode="disabled")
    tracker = make_tracker(cfg, run_dir, run_config={"lr": 0.1}, run_name="disabled-run")
    assert isinstance(tracker, CompositeTracker)
    with tracker:
        tracker.log({"loss": 1.5}, step=0)
        tracker.log_summary({"ppl": 7.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(run_dir)] == [(0, 1.5)]
    assert json.loads((run_dir / "summary.json").read_text()) == {"ppl": 7.0}
    assert not list(run_dir.glob("wandb/offline-run-*"))  # disabled writes no W&B run


def test_offline_mode_records_the_run_locally(wandb_env):
    run_dir = wandb_env / "run"
    artifact = wandb_env / "fit.json"
    artifact.write_text('{"alpha": 1.2}')
    cfg = TrackerConfig(kind="wandb", mode=WandbMode.offline, tags=("smoke", "cpu"), group="tests")
    tracker = make_tracker(cfg, run_dir, run_config={"model": {"d_model": 64}}, run_name="offline-run")
    wandb_tracker = tracker.trackers[1]
    run = wandb_tracker.run
    assert run.offline and run.name == "offline-run" and run.group == "tests"
    assert tuple(run.tags) == ("smoke", "cpu")
    assert run.config["model"] == {"d_model": 64}

    tracker.log({"train_loss": np.float32(2.0)}, step=0)
    tracker.log({"train_loss": 1.5}, step=1)
    tracker.log({"train_loss": 1.25}, step=2)  # commits step 1
    tracker.log_summary({"final_ppl": 12.5})
    tracker.log_artifact(artifact, name="power law fit", kind="fit")
    assert run.summary["final_ppl"] == 12.5
    assert run.summary["train_loss"] == 1.5
    tracker.finish()

    (offline_dir,) = run_dir.glob("wandb/offline-run-*")
    (log_file,) = offline_dir.glob("run-*.wandb")
    # wandb's service process writes the file a few milliseconds after finish() returns.
    deadline = time.monotonic() + 10
    while b"final_ppl" not in log_file.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b"train_loss" in log_file.read_bytes() and b"final_ppl" in log_file.read_bytes()
    assert [r["train_loss"] for r in read_metrics(run_dir)] == [2.0, 1.5, 1.25]
    artifacts = [json.loads(line) for line in (run_dir / "artifacts.jsonl").read_text().splitlines()]
    assert [(a["name"], a["kind"]) for a in artifacts] == [("power law fit", "fit")]
