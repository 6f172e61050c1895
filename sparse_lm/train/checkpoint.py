"""Orbax checkpoints of a training run: parameters, optimiser state, RNG and data position, atomically.

Each checkpoint holds the train state's arrays as a flat mapping (leaf index -> array) plus JSON metadata:
the step, the data position, tokens seen and every leaf's tree path. Restoring checks the paths against the
state the current config builds, so resuming with a different model names the first mismatching leaf.
Orbax writes into a temporary folder and renames it when complete: a run killed mid-save leaves the
previous checkpoint intact, and the partial folder is removed on the next start.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sparse_lm.data.tokenizer import Tokenizer, tokenizer_from_json, tokenizer_to_json
from sparse_lm.models.config import ModelConfig
from sparse_lm.models.transformer import Transformer
from sparse_lm.tracking.base import to_jsonable
from sparse_lm.utils.io import atomic_write_json

CHECKPOINT_DIR = "checkpoints"
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.json"


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the state the current configuration builds."""


def _flatten(tree: Any) -> tuple[list[str], list[Any]]:
    paths_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(p) for p, _ in paths_leaves], [leaf for _, leaf in paths_leaves]


class Checkpointer:
    """Saves and restores a train-state pytree under `<run_dir>/checkpoints/<step>`."""

    def __init__(self, run_dir: str | Path, keep: int, *, read_only: bool = False):
        self.directory = Path(run_dir).absolute() / CHECKPOINT_DIR
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(f"no checkpoint folder {self.directory}")
        # A reader must not clean up: the partial folder may be a save in progress by a running job.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=False, cleanup_tmp_directories=not read_only,
            create=not read_only, read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("arrays", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        paths, leaves = _flatten(state)
        arrays = {f"{i:05d}": np.asarray(jax.device_get(leaf)) for i, leaf in enumerate(leaves)}
        record = {**meta, "step": int(step), "paths": paths}
        self.manager.save(
            step, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(record))
        )
        self.manager.wait_until_finished()

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """The state saved at `step` (default: latest) in the structure of `template`, and its metadata."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        paths, leaves = _flatten(template)
        if meta["paths"] != paths:
            mismatch = next(
                (f"{a} vs {b}" for a, b in zip(meta["paths"], paths, strict=False) if a != b),
                f"{len(meta['paths'])} leaves saved vs {len(paths)} expected",
            )
            raise CheckpointMismatchError(
                f"checkpoint {self.directory / str(step)} does not match this configuration ({mismatch}); "
                "use a new run directory or the configuration that wrote it"
            )
        abstract = {f"{i:05d}": jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype) for i, leaf in enumerate(leaves)}
        arrays = self.manager.restore(
            step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract))
        )["arrays"]
        for i, leaf in enumerate(leaves):
            if arrays[f"{i:05d}"].shape != np.shape(leaf):
                raise CheckpointMismatchError(
                    f"checkpoint leaf {paths[i]} has shape {arrays[f'{i:05d}'].shape}, expected {np.shape(leaf)}"
                )
        treedef = jax.tree_util.tree_structure(template)
        return jax.tree_util.tree_unflatten(treedef, [arrays[f"{i:05d}"] for i in range(len(leaves))]), meta

    def close(self) -> None:
        self.manager.close()


def save_run_metadata(run_dir: Path, config: ModelConfig, tokenizer: Tokenizer) -> None:
    """What `load_trained` needs besides the arrays: the model's config and its tokenizer."""
    atomic_write_json(run_dir / MODEL_CONFIG_FILE, to_jsonable(config))
    atomic_write_json(run_dir / TOKENIZER_FILE, tokenizer_to_json(tokenizer))


def read_model_config(run_dir: Path) -> ModelConfig:
    path = run_dir / MODEL_CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: model.path must be a run directory of experiments/train.py")
    record = json.loads(path.read_text())
    if record.get("ffn_thresholds") is not None:
        record["ffn_thresholds"] = tuple(record["ffn_thresholds"])
    return ModelConfig(**record)


def load_trained(
    run_dir: str | Path, configure: Callable[[ModelConfig], ModelConfig] | None = None
) -> tuple[Transformer, Tokenizer]:
    """The model of a training run at its latest checkpoint, and its tokenizer.

    Args:
      run_dir: the run directory (holds model_config.json, tokenizer.json and checkpoints/).
      configure: optional change of the saved config (e.g. ModelSpec overrides such as ffn_thresholds);
        it must keep the parameter shapes.
    """
    run_dir = Path(run_dir)
    config = read_model_config(run_dir)
    if configure is not None:
        config = configure(config)
    tokenizer = tokenizer_from_json(json.loads((run_dir / TOKENIZER_FILE).read_text()))
    model = Transformer(config, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    checkpointer = Checkpointer(run_dir, keep=1, read_only=True)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {checkpointer.directory}")
        restored = checkpointer.manager.restore(
            step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        )
    finally:
        checkpointer.close()
    # The train state is (step, params, opt_state, rng): keep the parameter leaves.
    saved = {path: f"{i:05d}" for i, path in enumerate(restored["meta"]["paths"])}
    paths, leaves = _flatten(params)
    values = []
    for path, leaf in zip(paths, leaves, strict=True):
        key = saved.get(".params" + path)
        if key is None or restored["arrays"][key].shape != leaf.shape:
            raise CheckpointMismatchError(f"checkpoint at {run_dir} has no parameter {path} of shape {leaf.shape}")
        # StandardRestore without a target gives numpy arrays: a jitted step would copy every one of them to the
        # device on every call (decode of the ReLU-fied SmolLM2 ran at 14 instead of 35 tok/s)
        values.append(jnp.asarray(restored["arrays"][key], leaf.dtype))
    nnx.update(model, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), values))
    return model, tokenizer


def original_model_spec(run_dir: str | Path):
    """The ModelSpec of the model a training run started from, before its activation swap and thresholds (the
    original a ReLU-fied model is compared with); None for a run trained from random weights."""
    from sparse_lm.models.loading import ModelSpec, WeightSource  # loading builds checkpoints through this module

    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: model.path must be a run directory of experiments/train.py")
    spec = json.loads(path.read_text())["model"]
    if spec["source"] == WeightSource.random.value:
        return None
    spec.update(activation=None, ffn_thresholds=None, ffn_threshold_on=None)
    return ModelSpec(**spec)

