"""PowerInfer's published numbers (SOSP'24, arXiv 2312.12456) the cost model is validated against: per-model
sparsity, skew and predictor sizes, and the speedups and rates of its evaluation. All are "paper" numbers
(ANCHORS.md); where the paper does not give a number for a model, the stand-in and why is stated beside it.
"""

from __future__ import annotations

import dataclasses
import enum

from sparse_lm.roofline.shapes import ModelShape, Precision, get_shape
from sparse_lm.utils.config import coerce_enums


@dataclasses.dataclass(frozen=True)
class PaperModel:
    """What PowerInfer reports of one model.

    Attributes:
      active_fraction: 1 - FFN sparsity per token (Table 3; Table 1 for OPT-30B).
      hot_share: (fraction of neurons, share of activations they make) within one MLP.
      predictor_params: total predictor weights, when the paper gives them; else None (see predictor_params()).
      family: models of one family share a predictor-size share (see predictor_params()).
      source: where the three numbers come from.
    """

    shape: str
    active_fraction: float
    hot_share: tuple[float, float]
    predictor_params: float | None
    family: str
    source: str

    @property
    def model_shape(self) -> ModelShape:
        return get_shape(self.shape)


_OPT_SKEW = "skew: 26% of OPT-30B's MLP neurons make 80% of its activations"
_REGLU_SKEW = "skew: 43% of LLaMA2-ReGLU-70B's MLP neurons make 80%"

MODELS: dict[str, PaperModel] = {
    m.shape: m
    for m in (
        PaperModel("opt_13b", 0.03, (0.26, 0.80), 0.88e9, "opt",
                   "sparsity: Table 3 gives 96-98% for OPT-7B..175B, 97% (OPT-30B's) used; predictors 0.88B; "
                   + _OPT_SKEW + " (OPT-30B's used for all OPT)"),
        PaperModel("opt_30b", 0.03, (0.26, 0.80), None, "opt",
                   "sparsity 97% (Table 1); predictors not given; " + _OPT_SKEW),
        PaperModel("opt_66b", 0.03, (0.26, 0.80), 3.23e9, "opt",
                   "sparsity: Table 3 range 96-98%, 97% used; predictors 3.23B; " + _OPT_SKEW + " (OPT-30B's used)"),
        PaperModel("opt_175b", 0.03, (0.26, 0.80), None, "opt",
                   "sparsity: Table 3 range 96-98%, 97% used; predictors not given; " + _OPT_SKEW
                   + " (OPT-30B's used)"),
        PaperModel("falcon_40b", 0.05, (0.26, 0.80), 3.63e9, "falcon",
                   "sparsity 95% (Table 3); predictors 3.63B; skew not given: OPT-30B's used (both plain ReLU MLPs)"),
        PaperModel("llama_reglu_7b", 0.30, (0.43, 0.80), None, "llama",
                   "sparsity 70% (Table 3); predictors not given; " + _REGLU_SKEW + " (70B's used)"),
        PaperModel("llama_reglu_13b", 0.22, (0.43, 0.80), None, "llama",
                   "sparsity 78% (Table 3); predictors not given; " + _REGLU_SKEW + " (70B's used)"),
        PaperModel("llama_reglu_70b", 0.18, (0.43, 0.80), 5.66e9, "llama",
                   "sparsity 82% (Table 3); predictors 5.66B; " + _REGLU_SKEW),
        PaperModel("bamboo_7b", 0.10, (0.43, 0.80), None, "bamboo",
                   "sparsity 90% (Table 3); predictors not given; skew not given: LLaMA2-ReGLU-70B's used (gated)"),
    )
}


def get_model(name: str) -> PaperModel:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"PowerInfer reports no numbers for {name!r}; known: {', '.join(sorted(MODELS))}") from None


def predictor_params(name: str) -> tuple[float, str]:
    """Total predictor weights of a model and how they were obtained.

    The paper's size when it gives one; otherwise the same share of the model's parameters as the paper's model
    of the same family nearest in size (the share falls with size in OPT: 6.71% at 13B, 4.88% at 66B); for a
    family with none, the mean share of the four sizes given.
    """
    model = get_model(name)
    size = model.model_shape.n_params
    if model.predictor_params is not None:
        return model.predictor_params, "paper"
    given = [m for m in MODELS.values() if m.predictor_params is not None]
    relatives = [m for m in given if m.family == model.family]
    if relatives:
        nearest = min(relatives, key=lambda m: abs(m.model_shape.n_params - size))
        share = nearest.predictor_params / nearest.model_shape.n_params
        return share * size, f"{share:.2%} of parameters, as {nearest.shape} (paper)"
    share = sum(m.predictor_params / m.model_shape.n_params for m in given) / len(given)
    return share * size, f"{share:.2%} of parameters, the mean share of the paper's four predictor sizes"


class Metric(str, enum.Enum):
    """What a case compares."""

    speedup = "speedup"  # PowerInfer tokens/s over llama.cpp's (layer_split) on the same machine
    ratio_to_a100 = "ratio_to_a100"  # PowerInfer tokens/s over a dense A100 (all_fast) at the same precision
    tokens_per_s = "tokens_per_s"  # PowerInfer's own rate

    def __str__(self) -> str:
        return self.value


class Aggregate(str, enum.Enum):
    single = "single"
    mean = "mean"  # arithmetic mean over the case's models
    max = "max"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class PaperCase:
    """One number of PowerInfer's evaluation. `models` is the set the number is over (for means and maxima the
    paper's figure; the anchors do not list them, so the sets are stated in `note`)."""

    name: str
    metric: Metric
    aggregate: Aggregate
    models: tuple[str, ...]
    precision: Precision
    hardware: str
    paper_value: float
    source: str
    note: str = ""

    def __post_init__(self):
        coerce_enums(self, self.name, {"metric": Metric, "aggregate": Aggregate, "precision": Precision})
        if self.aggregate is Aggregate.single and len(self.models) != 1:
            raise ValueError(f"case {self.name}: a single number needs exactly one model, got {self.models}")


# The INT4 evaluation covered the models at least 30B (OPT-30B/66B, Falcon-40B, LLaMA-ReGLU-70B), with OPT-175B on
# PC-High only (its INT4 weights, ~92 GiB, exceed PC-Low's 64 GB + 11 GB). Our reading of the paper's figures,
# not a number the anchors give: see each case's note.
INT4_PC_HIGH = ("opt_30b", "opt_66b", "falcon_40b", "llama_reglu_70b", "opt_175b")
INT4_PC_LOW = ("opt_30b", "opt_66b", "falcon_40b", "llama_reglu_70b")
FP16_PC_HIGH = ("opt_30b", "opt_66b", "falcon_40b", "llama_reglu_70b")  # FP16 OPT-175B (350 GB) does not fit
_SET_NOTE = "model set assumed (the anchors give the number, not the models it averages over)"

CASES: dict[str, PaperCase] = {
    c.name: c
    for c in (
        PaperCase("falcon40b_fp16_pc_high", Metric.speedup, Aggregate.single, ("falcon_40b",), Precision.fp16,
                  "pc_high", 11.69, "paper: up to 11.69x over llama.cpp, Falcon-40B FP16 on PC-High"),
        PaperCase("int4_mean_pc_high", Metric.speedup, Aggregate.mean, INT4_PC_HIGH, Precision.int4, "pc_high",
                  2.89, "paper: INT4 average speedup 2.89x on PC-High", _SET_NOTE),
        PaperCase("int4_max_pc_high", Metric.speedup, Aggregate.max, INT4_PC_HIGH, Precision.int4, "pc_high",
                  4.28, "paper: INT4 maximum speedup 4.28x on PC-High", _SET_NOTE),
        PaperCase("int4_mean_pc_low", Metric.speedup, Aggregate.mean, INT4_PC_LOW, Precision.int4, "pc_low",
                  5.01, "paper: INT4 average speedup 5.01x on PC-Low", _SET_NOTE),
        PaperCase("int4_max_pc_low", Metric.speedup, Aggregate.max, INT4_PC_LOW, Precision.int4, "pc_low",
                  8.00, "paper: INT4 maximum speedup 8.00x on PC-Low", _SET_NOTE),
        PaperCase("opt175b_int4_pc_high", Metric.speedup, Aggregate.single, ("opt_175b",), Precision.int4,
                  "pc_high", 2.66, "paper: OPT-175B INT4 2.66x (about 2 tokens/s) on PC-High"),
        PaperCase("opt30b_vs_a100", Metric.ratio_to_a100, Aggregate.single, ("opt_30b",), Precision.fp16,
                  "pc_high", 0.82, "paper: OPT-30B on one RTX 4090 reaches 82% of an A100's rate (input length 1)",
                  "precision assumed FP16 (the A100 holds OPT-30B's 60 GB); the A100 side is dense all_fast"),
        PaperCase("int4_mean_rate_pc_high", Metric.tokens_per_s, Aggregate.mean, INT4_PC_HIGH, Precision.int4,
                  "pc_high", 13.20, "paper: INT4 average 13.20 tokens/s on one RTX 4090", _SET_NOTE),
        PaperCase("int4_peak_rate_pc_high", Metric.tokens_per_s, Aggregate.max, INT4_PC_HIGH, Precision.int4,
                  "pc_high", 29.08, "paper: INT4 peak 29.08 tokens/s on one RTX 4090", _SET_NOTE),
        PaperCase("fp16_mean_rate_pc_high", Metric.tokens_per_s, Aggregate.mean, FP16_PC_HIGH, Precision.fp16,
                  "pc_high", 8.32, "paper: FP16 average 8.32 tokens/s on one RTX 4090", _SET_NOTE),
        PaperCase("fp16_peak_rate_pc_high", Metric.tokens_per_s, Aggregate.max, FP16_PC_HIGH, Precision.fp16,
                  "pc_high", 16.06, "paper: FP16 peak 16.06 tokens/s on one RTX 4090", _SET_NOTE),
    )
}


def get_case(name: str) -> PaperCase:
    try:
        return CASES[name]
    except KeyError:
        raise KeyError(f"unknown validation case {name!r}; known cases: {', '.join(CASES)}") from None
