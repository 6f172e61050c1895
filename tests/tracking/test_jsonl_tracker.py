"""JsonlTracker: what lands in the run directory, and how it survives reopening and crashes."""

import json
import math
import time

import numpy as np
import pytest

from sparse_lm.tracking import JsonlTracker, read_metrics


def test_metrics_round_trip(tmp_path):
    before = time.time()
    with JsonlTracker(tmp_path) as tracker:
        tracker.log({"loss": 2.5, "tokens": 128}, step=10)
        tracker.log({"loss": np.float32(1.25), "lr": np.array(3e-4)})  # step None: the next one
        tracker.log({"loss": float("nan")}, step=20)
    after = time.time()

    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [10, 11, 20]
    assert records[0]["loss"] == 2.5 and records[0]["tokens"] == 128 and isinstance(records[0]["tokens"], int)
    assert records[1]["loss"] == 1.25 and records[1]["lr"] == pytest.approx(3e-4)
    assert math.isnan(records[2]["loss"])
    times = [r["wall_time"] for r in records]
    assert before <= times[0] <= times[1] <= times[2] <= after
    # One JSON object per line: readable without this library.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["loss"] == 2.5


def test_each_line_is_on_disk_before_finish(tmp_path):
    tracker = JsonlTracker(tmp_path)
    tracker.log({"loss": 3.0}, step=0)
    # No finish(): a crash at this point must not lose the line, so another reader already sees it.
    (record,) = read_metrics(tmp_path)
    assert (record["step"], record["loss"]) == (0, 3.0)
    tracker.finish()


def test_summary_merges_and_is_written_each_time(tmp_path):
    tracker = JsonlTracker(tmp_path)
    tracker.log_summary({"perplexity": 12.5, "sparsity": 0.8})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"perplexity": 12.5, "sparsity": 0.8}
    tracker.log_summary({"perplexity": 11.0, "model": "smollm2", "layers": np.arange(3)})
    tracker.finish()
    assert json.loads((tmp_path / "summary.json").read_text()) == {
        "perplexity": 11.0,
        "sparsity": 0.8,
        "model": "smollm2",
        "layers": [0, 1, 2],
    }


def test_artifacts_are_listed_with_relative_paths(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "params.bin").write_bytes(b"x" * 100)
    outside = tmp_path.parent / f"{tmp_path.name}_outside.txt"
    outside.write_text("hello")
    try:
        with JsonlTracker(tmp_path / "run") as tracker:
            (tmp_path / "run" / "fit.png").write_bytes(b"y" * 7)
            tracker.log_artifact(tmp_path / "run" / "fit.png", kind="figure")
            tracker.log_artifact(tmp_path / "ckpt", name="checkpoint", kind="checkpoint")
            tracker.log_artifact(outside)
            with pytest.raises(FileNotFoundError, match="missing.txt"):
                tracker.log_artifact(tmp_path / "missing.txt")
        lines = (tmp_path / "run" / "artifacts.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        for record in records:
            record.pop("wall_time")
        assert records == [
            {"name": "fit.png", "kind": "figure", "path": "fit.png", "bytes": 7},
            {
                "name": "checkpoint",
                "kind": "checkpoint",
                "path": str((tmp_path / "ckpt").resolve()),
                "bytes": 100,
            },
            {"name": outside.name, "kind": "file", "path": str(outside.resolve()), "bytes": 5},
        ]
    finally:
        outside.unlink()


def test_config_is_saved(tmp_path):
    JsonlTracker(tmp_path, config={"model": {"d_model": 64}, "tags": ("a",)}).finish()
    assert json.loads((tmp_path / "config.json").read_text()) == {"model": {"d_model": 64}, "tags": ["a"]}


def test_reopening_appends_and_continues_steps(tmp_path):
    with JsonlTracker(tmp_path) as tracker:
        tracker.log({"loss": 1.0})
        tracker.log({"loss": 0.9})
        tracker.log_summary({"a": 1})
    with JsonlTracker(tmp_path) as tracker:
        tracker.log({"loss": 0.8})
        tracker.log_summary({"b": 2})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(0, 1.0), (1, 0.9), (2, 0.8)]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"a": 1, "b": 2}


def test_line_torn_by_a_crash_is_dropped_on_reopen(tmp_path):
    with JsonlTracker(tmp_path) as tracker:
        tracker.log({"loss": 1.0}, step=5)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "wall_ti')  # the process died mid-line
    assert [r["step"] for r in read_metrics(tmp_path)] == [5]  # a reader skips a torn last line
    with JsonlTracker(tmp_path) as tracker:
        tracker.log({"loss": 0.5})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(5, 1.0), (6, 0.5)]


def test_corrupt_line_in_the_middle_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(tmp_path)


def test_bad_metrics_are_rejected(tmp_path):
    with JsonlTracker(tmp_path) as tracker:
        with pytest.raises(TypeError, match="'name'"):
            tracker.log({"name": "smollm2"})
        with pytest.raises(TypeError, match="'hist'"):
            tracker.log({"hist": np.arange(3)})
        with pytest.raises(ValueError, match="reserved"):
            tracker.log({"step": 3})
    with pytest.raises(RuntimeError, match="finished"):
        tracker.log({"loss": 1.0})
    tracker.finish()  # a second finish is harmless
    assert (tmp_path / "metrics.jsonl").read_text() == ""
