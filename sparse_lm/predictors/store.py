"""Saving and loading a trained PredictorSet with orbax (parameters) and JSON (ranks, thresholds, model shape)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sparse_lm.models.config import ModelConfig
from sparse_lm.predictors.module import HiddenActivation, PredictorSet
from sparse_lm.utils.io import atomic_write_json

META = "predictors.json"
PARAMS = "params"


def save_predictors(folder: str | Path, predictors: PredictorSet, config: ModelConfig) -> Path:
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    state = nnx.state(predictors, nnx.Param)
    flat = {f"{i:05d}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(state))}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(folder / PARAMS, flat, force=True)
    checkpointer.wait_until_finished()
    atomic_write_json(folder / META, {
        "model": config.name, "n_layers": config.n_layers, "d_model": config.d_model, "d_ff": config.d_ff,
        "ranks": list(predictors.ranks), "hidden_activation": predictors.layers[0].hidden_activation.value,
        "thresholds": np.asarray(predictors.thresholds[...]).tolist(),
    })
    return folder


def load_predictors(folder: str | Path, config: ModelConfig) -> PredictorSet:
    """The predictors saved in `folder`, checked against the model they will gate."""
    folder = Path(folder).absolute()
    if not (folder / META).exists():
        raise FileNotFoundError(f"{folder / META} not found: not a saved predictor set")
    meta = json.loads((folder / META).read_text())
    shape = ModelConfig(name=meta["model"], n_layers=meta["n_layers"], d_model=meta["d_model"], d_ff=meta["d_ff"],
                        n_heads=1, n_kv_heads=1, head_dim=2)
    predictors = PredictorSet(shape, meta["ranks"], HiddenActivation(meta["hidden_activation"]), rngs=nnx.Rngs(0))
    predictors.check_fits(config)
    state = nnx.state(predictors, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    abstract = {f"{i:05d}": jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for i, leaf in enumerate(leaves)}
    restored = ocp.StandardCheckpointer().restore(folder / PARAMS, abstract)
    nnx.update(predictors, jax.tree.unflatten(treedef, [restored[f"{i:05d}"] for i in range(len(leaves))]))
    predictors.thresholds[...] = np.asarray(meta["thresholds"], np.float32)
    return predictors


def attach(model, predictors: PredictorSet | None) -> None:
    """Gates every FFN of `model` with its layer's predictor and threshold (None detaches them)."""
    if predictors is not None:
        predictors.check_fits(model.config)
    for layer, block in enumerate(model.blocks):
        if predictors is None:
            block.ffn.predictor, block.ffn.predictor_threshold = None, 0.0
        else:
            block.ffn.predictor = predictors.layers[layer]
            block.ffn.predictor_threshold = float(predictors.thresholds[...][layer])
