"""The placement experiment (experiments/place.py): a firing profile (measured, or a synthetic power law), a
fast-tier budget, PowerInfer's program or greedy; writes the placement as a PowerInfer gpu-index file and a summary.
Legend: L layers, F neurons per layer.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Any

import numpy as np

from sparse_lm.offload.gpu_index import write_gpu_index
from sparse_lm.offload.placement import PlacementInfeasible, greedy_placement, ilp_placement
from sparse_lm.offload.profile_synth import synthetic_frequencies, top_share
from sparse_lm.offload.projection import GpuSetting, project_baselines, project_placement
from sparse_lm.offload.sizes import parse_size
from sparse_lm.profiling.counts import FiringCounts
from sparse_lm.results import current_command, write_result
from sparse_lm.roofline import paper
from sparse_lm.roofline.hardware import HardwareSpec
from sparse_lm.roofline.project import CostParams
from sparse_lm.roofline.shapes import ModelShape, Precision, get_shape
from sparse_lm.utils.config import coerce_enums
from sparse_lm.utils.io import atomic_write_json


class Solver(str, enum.Enum):
    ilp = "ilp"  # PowerInfer's program, solved by HiGHS
    greedy = "greedy"  # top-k over the same groups (PowerInfer's released solver)

    def __str__(self) -> str:
        return self.value


# Our own measurement of the ReLU-fied dReLU SmolLM2-135M (results/profile_smollm2_drelu.json: 65,536 WEB tokens,
# firing = nonzero): per layer, its active fraction and the share of its firings made by its top 26% of neurons
# (0.38 to 0.79, mean 0.655). The power-law fit of that profile (exponent 4.18) describes its tail only (the 12% of
# neurons above x_min); drawn as the whole law it would give the top 26% just 39% of the firings, so the default
# calibrates each layer's law to its measured share.
SMOLLM2_DRELU_ACTIVE = (
    0.405, 0.149, 0.14, 0.158, 0.108, 0.098, 0.106, 0.105, 0.116, 0.119, 0.112, 0.112, 0.141, 0.125, 0.166,
    0.168, 0.196, 0.225, 0.232, 0.224, 0.241, 0.212, 0.227, 0.187, 0.203, 0.209, 0.227, 0.279, 0.258, 0.264,
)
SMOLLM2_DRELU_HOT_SHARE = (
    0.379, 0.505, 0.58, 0.586, 0.679, 0.69, 0.741, 0.713, 0.723, 0.769, 0.761, 0.73, 0.749, 0.793, 0.756,
    0.761, 0.715, 0.644, 0.605, 0.622, 0.578, 0.612, 0.611, 0.643, 0.616, 0.589, 0.592, 0.596, 0.618, 0.701,
)


@dataclasses.dataclass(frozen=True)
class SyntheticProfileConfig:
    """A power-law profile for shapes with no measured one (sparse_lm.offload.profile_synth).

    Attributes:
      exponent: density exponent of per-neuron firing frequencies; when given, it replaces `hot_share`.
      hot_fraction, hot_share: each layer's exponent is calibrated so its top `hot_fraction` of neurons make
        `hot_share` of its firings (one value, or a per-layer list resampled like `active_fraction`), e.g. 0.26
        and [0.8] for OPT-30B as PowerInfer reports it; the default is our SmolLM2 measurement.
      active_fraction: firing probability per layer (one value, or a per-layer list resampled to the shape's
        depth by relative position, so a 30-layer profile describes an 80-layer model).
      seed: seeds the shuffle of neurons within a layer.
    """

    exponent: float | None = None
    hot_fraction: float = 0.26
    hot_share: tuple[float, ...] | None = SMOLLM2_DRELU_HOT_SHARE
    active_fraction: tuple[float, ...] = SMOLLM2_DRELU_ACTIVE
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "active_fraction", tuple(float(f) for f in self.active_fraction))
        if self.exponent is not None and self.hot_share is not None:
            object.__setattr__(self, "hot_share", None)  # a given exponent replaces the default calibration
        if self.exponent is None and self.hot_share is None:
            raise ValueError("synthetic: give synthetic.exponent or synthetic.hot_share")
        if self.hot_share is not None:
            object.__setattr__(self, "hot_share", tuple(float(f) for f in self.hot_share))
            if not self.hot_share or not all(0 < f < 1 for f in self.hot_share):
                raise ValueError(f"synthetic.hot_share must be values in (0, 1), got {self.hot_share}")
        if not 0 < self.hot_fraction < 1:
            raise ValueError(f"synthetic.hot_fraction must be in (0, 1), got {self.hot_fraction}")
        if not self.active_fraction or not all(0 < f <= 1 for f in self.active_fraction):
            raise ValueError(f"synthetic.active_fraction must be values in (0, 1], got {self.active_fraction}")

    @staticmethod
    def resample(values: tuple[float, ...], layers: int) -> np.ndarray:
        """Per-layer values for `layers` layers, by relative depth (one value applies to all)."""
        values = np.asarray(values, np.float64)
        if values.size == 1:
            return np.full(layers, values[0])
        return np.interp(np.linspace(0, 1, layers), np.linspace(0, 1, values.size), values)


@dataclasses.dataclass(frozen=True)
class PlaceRunConfig:
    """Schema of `conf/place.yaml`.

    Attributes:
      model_shape: a shape of sparse_lm.roofline.shapes (llama7b, opt_30b, smollm2_135m, ...).
      solver: ilp or greedy; the summary always reports greedy's objective beside the program's.
      budget: fast-tier memory: a size ("8GiB", "500MB") or a share of the FFN weights ("25%").
      precision: storage of the weights (bytes per neuron follow from it).
      hardware: null, or a GPU machine (conf/hardware: pc_high, pc_low, a100, h100). With one,
        `budget` is its GPU memory: the neurons get what the cost model leaves after attention, predictors, KV
        cache and head, the per-layer bound follows from the machine, and the summary projects decode tokens/s
        for this placement and for the baselines (layer_split, flexgen, all_fast) at the same GPU memory.
      reserve_attention: without hardware: the attention weights sit on the fast tier first (PowerInfer) and
        come out of the budget.
      group_size: neurons per binary of the program (PowerInfer: 64).
      min_neurons: per layer, at least this many fast neurons or none (PowerInfer's communication constraint as
        a count); null: derived from the hardware's bandwidths and hand-off time (0 without hardware).
      context, kv_capacity: tokens attended to by the projected decode step, and tokens of KV cache on the GPU.
      predictor_params: weights of all predictors on the GPU; null: PowerInfer's size for its models, else 0.
      time_limit: seconds HiGHS may take before returning its incumbent.
      profile: a counts file (`counts_total.npz` of experiments/profile.py) of this shape; null draws `synthetic`.
    """

    model_shape: str = "llama7b"
    solver: Solver = Solver.ilp
    budget: str = "25%"
    precision: Precision = Precision.fp16
    hardware: HardwareSpec | None = None
    reserve_attention: bool = True
    group_size: int = 64
    min_neurons: int | None = None
    time_limit: float = 60.0
    context: int = 128
    kv_capacity: int = 192
    predictor_params: float | None = None
    profile: str | None = None
    synthetic: SyntheticProfileConfig = dataclasses.field(default_factory=SyntheticProfileConfig)
    record_as: str | None = None
    results_dir: str = "results"

    def __post_init__(self):
        coerce_enums(self, "", {"solver": Solver, "precision": Precision})
        if isinstance(self.synthetic, dict):
            object.__setattr__(self, "synthetic", SyntheticProfileConfig(**self.synthetic))
        get_shape(self.model_shape)  # a bad name fails here, naming the known shapes
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.min_neurons is not None and self.min_neurons < 0:
            raise ValueError(f"min_neurons must be >= 0, got {self.min_neurons}")
        if not 1 <= self.context <= self.kv_capacity:
            raise ValueError(f"need 1 <= context <= kv_capacity, got {self.context} and {self.kv_capacity}")
        if self.time_limit <= 0:
            raise ValueError(f"time_limit must be > 0 seconds, got {self.time_limit}")


def load_profile(cfg: PlaceRunConfig, shape: ModelShape) -> tuple[np.ndarray, str]:
    """Per-neuron firing frequencies [L, F] and a description of where they come from."""
    if cfg.profile is not None:
        counts = FiringCounts.load(cfg.profile)
        if counts.counts.shape != (shape.n_layers, shape.d_ff):
            raise ValueError(f"profile={cfg.profile}: counts of shape {counts.counts.shape} do not fit "
                             f"model_shape={cfg.model_shape} ({shape.n_layers} x {shape.d_ff})")
        if counts.tokens < 1:
            raise ValueError(f"profile={cfg.profile}: no tokens profiled")
        return counts.counts / counts.tokens, f"measured: {cfg.profile} ({counts.tokens} tokens)"
    synthetic = cfg.synthetic
    fractions = synthetic.resample(synthetic.active_fraction, shape.n_layers)
    hot_share = None if synthetic.hot_share is None else (
        synthetic.hot_fraction, synthetic.resample(synthetic.hot_share, shape.n_layers))
    frequencies = synthetic_frequencies(
        shape.n_layers, shape.d_ff, active_fraction=fractions, exponent=synthetic.exponent, hot_share=hot_share,
        seed=synthetic.seed,
    )
    law = f"exponent {synthetic.exponent}" if synthetic.exponent is not None else (
        f"top {synthetic.hot_fraction:.0%} of neurons making {hot_share[1].mean():.1%} of firings")
    return frequencies, (f"synthetic power law ({law}, mean active fraction {fractions.mean():.3f}): "
                         f"no measured profile of {cfg.model_shape}")


def _predictor_params(cfg: PlaceRunConfig) -> tuple[float, str]:
    if cfg.predictor_params is not None:
        return float(cfg.predictor_params), "given"
    if cfg.model_shape in paper.MODELS:
        return paper.predictor_params(cfg.model_shape)
    return 0.0, f"none: PowerInfer gives no predictor size for {cfg.model_shape} (an oracle that costs nothing)"


def run(cfg: PlaceRunConfig, run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", dataclasses.asdict(cfg) | {
        "solver": cfg.solver.value, "precision": cfg.precision.value})
    shape = get_shape(cfg.model_shape)
    neuron_bytes = shape.neuron_params * cfg.precision.bytes_per_weight
    ffn_bytes = shape.n_layers * shape.d_ff * neuron_bytes
    budget_bytes = parse_size(cfg.budget, int(ffn_bytes), key="budget")
    setting = None
    if cfg.hardware is not None:
        params = CostParams()
        if budget_bytes <= params.gpu_reserved_bytes:
            raise PlacementInfeasible(
                f"budget={cfg.budget} ({budget_bytes / 2**30:.2f} GiB) leaves nothing on the GPU once the "
                f"{params.gpu_reserved_bytes / 2**30:.2f} GiB of CUDA context and buffers are set aside"
            )
        predictors, predictor_source = _predictor_params(cfg)
        setting = GpuSetting.with_budget(cfg.hardware.resolve(), budget_bytes, precision=cfg.precision,
                                         context=cfg.context, kv_capacity=cfg.kv_capacity,
                                         predictor_params=predictors, params=params)
        capacity = setting.ffn_capacity(shape)
        reserved = budget_bytes - capacity * neuron_bytes
        min_neurons = setting.min_neurons(shape) if cfg.min_neurons is None else cfg.min_neurons
    else:
        reserved = shape.n_layers * shape.attention_params * cfg.precision.bytes_per_weight \
            if cfg.reserve_attention else 0
        if budget_bytes < reserved:
            raise PlacementInfeasible(
                f"budget={cfg.budget} ({budget_bytes / 2**30:.2f} GiB) is below the {reserved / 2**30:.2f} GiB the "
                f"attention weights of {cfg.model_shape} take on the fast tier (reserve_attention=true)"
            )
        capacity = min(int((budget_bytes - reserved) // neuron_bytes), shape.n_layers * shape.d_ff)
        min_neurons = cfg.min_neurons or 0
    frequencies, source = load_profile(cfg, shape)
    options = {"group_size": cfg.group_size, "min_neurons": min_neurons}
    greedy = greedy_placement(frequencies, capacity, **options)
    placement = ilp_placement(frequencies, capacity, time_limit=cfg.time_limit, **options) \
        if cfg.solver is Solver.ilp else greedy
    write_gpu_index(run_dir / "placement.gpuidx", placement.mask, budget_bytes)
    total = float(frequencies.sum())
    summary = {
        "model_shape": cfg.model_shape,
        "solver": cfg.solver.value,
        "status": placement.status,
        "objective": placement.objective,
        "objective_greedy": greedy.objective,
        "objective_gain_over_greedy": placement.objective / greedy.objective - 1 if greedy.objective else None,
        "solve_seconds": placement.solve_seconds,
        "solve_seconds_greedy": greedy.solve_seconds,
        "mip_gap": placement.mip_gap,
        "budget_bytes": budget_bytes,
        "reserved_bytes": reserved,
        "ffn_bytes": ffn_bytes,
        "neuron_bytes": neuron_bytes,
        "capacity_neurons": capacity,
        "min_neurons": min_neurons,
        "fast_neurons": int(placement.mask.sum()),
        "fast_fraction": float(placement.mask.mean()),
        "fast_firing_share": float(frequencies[placement.mask].sum() / total),
        "fast_neurons_per_layer": placement.fast_neurons.tolist(),
        "fast_firing_share_per_layer": placement.fast_firing_share(frequencies).tolist(),
        "active_fraction": float(frequencies.mean()),
        "top_20pct_share": float(np.mean([top_share(row, 0.2) for row in frequencies])),
        "profile": source,
        "synthetic_profile": cfg.profile is None,
        "gpu_index": str(run_dir / "placement.gpuidx"),
    }
    if setting is not None:
        mine = project_placement(shape, setting, placement.mask, frequencies)
        baselines = project_baselines(shape, setting)
        summary |= {
            "hardware": cfg.hardware.name,
            "predictor_params": setting.predictor_params,
            "predictor_source": predictor_source,
            "projected_tokens_per_s": mine["tokens_per_s"],
            "projected_tokens_per_s_greedy": project_placement(shape, setting, greedy.mask, frequencies)[
                "tokens_per_s"],
            **{f"projected_tokens_per_s_{name}": p["tokens_per_s"] for name, p in baselines.items()},
            "all_fast_fits": bool(baselines["all_fast"]["plan_fits"]),
            "projected_speedup_over_layer_split": mine["tokens_per_s"] / baselines["layer_split"]["tokens_per_s"],
            "projection": mine,
            "projection_baselines": baselines,
        }
    atomic_write_json(run_dir / "summary.json", summary)
    if cfg.record_as:
        scalars = {k: v for k, v in summary.items() if isinstance(v, int | float | str | bool) and k != "gpu_index"}
        write_result(cfg.record_as, scalars, command=current_command(),
                     title=f"Neuron placement: {cfg.model_shape}, {cfg.solver.value}, budget {cfg.budget}",
                     notes=f"Profile: {source}.", results_dir=cfg.results_dir)
    return summary
