"""Shared pieces of the training tests: a tiny run configuration on a text file."""

from __future__ import annotations

from pathlib import Path

from sparse_lm.data import DataConfig
from sparse_lm.models.loading import ModelSpec
from sparse_lm.train import TrainConfig, TrainEvalConfig, TrainRunConfig

ROOT = Path(__file__).resolve().parents[2]
TEXT = (ROOT / "tests" / "fixtures" / "pydocs_sample" / "tutorial" / "interactive.rst.txt").read_text() * 3


def tiny_run_config(text_file: Path, tmp_path: Path, **train_changes) -> TrainRunConfig:
    """A 2-layer byte-level model on a text file: steps take milliseconds."""
    train = dict(steps=6, batch_size=4, seq_len=32, log_every=1, eval_every=3, checkpoint_every=2,
                 progress=False)
    train.update(train_changes)
    return TrainRunConfig(
        model=ModelSpec(preset="tiny", source="random", activation="drelu"),
        data=DataConfig(corpus="textfile", path=str(text_file), split="all", cache_dir=str(tmp_path / "cache")),
        train=TrainConfig(**train),
        eval=TrainEvalConfig(tokens=512, batch_size=4),
        name="tiny",
        results_dir=str(tmp_path / "results"),
    )
