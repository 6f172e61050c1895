"""NoopTracker, CompositeTracker, make_tracker, and the Tracker protocol."""

import json

import pytest

from sparse_lm.tracking import (
    CompositeTracker,
    JsonlTracker,
    NoopTracker,
    Tracker,
    TrackerConfig,
    make_tracker,
    read_metrics,
)


class RecordingTracker:
    def __init__(self, fail_on_finish=False):
        self.calls = []
        self.fail_on_finish = fail_on_finish

    def log(self, metrics, step=None):
        self.calls.append(("log", dict(metrics), step))

    def log_summary(self, metrics):
        self.calls.append(("log_summary", dict(metrics)))

    def log_artifact(self, path, name=None, kind="file"):
        self.calls.append(("log_artifact", str(path), name, kind))

    def finish(self):
        self.calls.append(("finish",))
        if self.fail_on_finish:
            raise OSError("disk full")


def test_implementations_satisfy_the_protocol(tmp_path):
    for tracker in (NoopTracker(), JsonlTracker(tmp_path), CompositeTracker([]), RecordingTracker()):
        assert isinstance(tracker, Tracker)
        tracker.finish()
    assert not isinstance(object(), Tracker)


def test_noop_writes_nothing(tmp_path):
    artifact = tmp_path / "a.txt"
    artifact.write_text("x")
    with NoopTracker() as tracker:
        tracker.log({"loss": 1.0}, step=0)
        tracker.log_summary({"ppl": 3.0})
        tracker.log_artifact(artifact)
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_composite_fans_out_in_order(tmp_path):
    first, second = RecordingTracker(), RecordingTracker()
    with CompositeTracker([first, JsonlTracker(tmp_path), second]) as tracker:
        tracker.log({"loss": 1.5}, step=3)
        tracker.log_summary({"ppl": 4.0})
        tracker.log_artifact(tmp_path / "metrics.jsonl", name="m", kind="table")
    expected = [
        ("log", {"loss": 1.5}, 3),
        ("log_summary", {"ppl": 4.0}),
        ("log_artifact", str(tmp_path / "metrics.jsonl"), "m", "table"),
        ("finish",),
    ]
    assert first.calls == expected and second.calls == expected
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(3, 1.5)]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"ppl": 4.0}


def test_composite_finishes_every_tracker_when_one_fails():
    failing, other = RecordingTracker(fail_on_finish=True), RecordingTracker()
    with pytest.raises(OSError, match="disk full"):
        CompositeTracker([failing, other]).finish()
    assert other.calls == [("finish",)]


def test_make_tracker_kinds(tmp_path):
    assert isinstance(make_tracker(TrackerConfig(kind="noop"), tmp_path / "noop"), NoopTracker)
    assert not (tmp_path / "noop").exists()

    tracker = make_tracker(TrackerConfig(kind="jsonl"), tmp_path / "jsonl", run_config={"seed": 0})
    assert isinstance(tracker, JsonlTracker)
    tracker.log({"loss": 1.0}, step=0)
    tracker.finish()
    assert read_metrics(tmp_path / "jsonl")[0]["loss"] == 1.0
    assert json.loads((tmp_path / "jsonl" / "config.json").read_text()) == {"seed": 0}
