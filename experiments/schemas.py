"""Registers the library's config dataclasses in Hydra's ConfigStore as schemas of `conf/*.yaml`.

With a schema, Hydra rejects a misspelled key or a mistyped value while composing, before any compute.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from sparse_lm.bench.decode import DecodeBenchConfig
from sparse_lm.bench.disk_tier import DiskTierBenchConfig
from sparse_lm.bench.ffn import FfnBenchConfig
from sparse_lm.eval.frontier import FrontierRunConfig
from sparse_lm.eval.run import EvalRunConfig
from sparse_lm.offload.run import PlaceRunConfig
from sparse_lm.predictors.run import PredictorRunConfig
from sparse_lm.predictors.scaling import ScalingRunConfig
from sparse_lm.profiling.run import ProfileRunConfig
from sparse_lm.profiling.teal import TealRunConfig
from sparse_lm.roofline.calibrate import CalibrationConfig
from sparse_lm.roofline.validate import ValidationConfig
from sparse_lm.train.config import TrainRunConfig


def schema(dataclass_type: type) -> DictConfig:
    """A structured config of a frozen dataclass that Hydra may still merge overrides into.

    OmegaConf marks frozen dataclasses read-only, which would refuse every override; the dataclass
    itself is frozen again when `OmegaConf.to_object` builds it.
    """
    node = OmegaConf.structured(dataclass_type)
    _clear_readonly(node)
    return node


def _clear_readonly(node: DictConfig) -> None:
    OmegaConf.set_readonly(node, False)
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _clear_readonly(child)


def register() -> None:
    store = ConfigStore.instance()
    store.store(name="eval_schema", node=schema(EvalRunConfig))
    store.store(name="frontier_schema", node=schema(FrontierRunConfig))
    store.store(name="bench_decode_schema", node=schema(DecodeBenchConfig))
    store.store(name="bench_disk_tier_schema", node=schema(DiskTierBenchConfig))
    store.store(name="bench_ffn_schema", node=schema(FfnBenchConfig))
    store.store(name="place_schema", node=schema(PlaceRunConfig))
    store.store(name="profile_schema", node=schema(ProfileRunConfig))
    store.store(name="teal_schema", node=schema(TealRunConfig))
    store.store(name="train_schema", node=schema(TrainRunConfig))
    store.store(name="train_predictor_schema", node=schema(PredictorRunConfig))
    store.store(name="predictor_scaling_schema", node=schema(ScalingRunConfig))
    store.store(name="calibrate_hardware_schema", node=schema(CalibrationConfig))
    store.store(name="validate_cost_model_schema", node=schema(ValidationConfig))
