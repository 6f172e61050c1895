"""Power-law fit of the neuron firing-frequency distribution (Clauset-Shalizi-Newman via the `powerlaw` package)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import types
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from jaxtyping import Int, Real
from scipy.optimize import OptimizeWarning

# Legend: L layers, F neurons per layer (d_ff), N samples (positive firing counts of the chosen neurons).
#
# The sample is the per-neuron firing count: one value per neuron, how many profiled tokens it fired on.
# "Firing frequencies follow a power law" means P(count = x) ~ x^-alpha for x >= xmin. Counts are integers,
# so `discrete=True` (the discrete power law, normalised by the Hurwitz zeta function) is the natural
# model; rates (counts / tokens) only rescale x, which leaves alpha unchanged but loses integrality.

Verdict = Literal["power_law", "alternative", "inconclusive"]
BootstrapXmin = Literal["refit", "fixed"]

ALTERNATIVES = ("lognormal", "exponential", "truncated_power_law", "stretched_exponential", "lognormal_positive")
DEFAULT_ALTERNATIVES = ("lognormal", "exponential", "truncated_power_law")
# The power law is the truncated power law with Lambda = 0, so that comparison uses the nested
# (chi-squared, 1 dof) p-value instead of Vuong's normalized test.
NESTED_ALTERNATIVES = frozenset({"truncated_power_law"})
# Clauset, Shalizi & Newman (2009) call the sign of R meaningful only when p < 0.1.
SIGNIFICANCE = 0.1
MIN_SAMPLES = 10
# `powerlaw` bounds alpha to [0, 3] by default, which silently pins any steeper tail at ~3 (and then picks
# an x_min deep in the tail where 3 fits, without flagging the fit): widen it. The lower bound stays the
# package's 0 (it fits alpha <= 1 with the largest sample as an implicit upper cut-off).
DEFAULT_ALPHA_RANGE = (0.0, 10.0)


# ------------------------------------------------------------------------------------------------ results


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Log-likelihood-ratio test of the power law against one alternative, on the tail x >= xmin.

    Attributes:
      alternative: name of the alternative distribution (a `powerlaw` name, e.g. "lognormal").
      loglikelihood_ratio: R = sum over the tail of log p_power_law(x) - log p_alternative(x); R > 0 favours
        the power law.
      p_value: significance of the sign of R: Vuong's normalized test for non-nested alternatives, the
        chi-squared (1 dof) likelihood-ratio test when `nested`.
      nested: whether the power law is a special case of the alternative.
      verdict: `comparison_verdict(loglikelihood_ratio, p_value)`.
      alternative_flagged: `powerlaw` flagged the alternative's fit: the optimiser failed, or a parameter
        ended within 0.01 (absolute) of the edge of its range. The latter is expected on a pure power law
        (the truncated power law's Lambda -> 0) and is always the case for an exponential rate below 0.01,
        i.e. for counts in the hundreds; after an optimiser failure R overstates the power law.
    """

    alternative: str
    loglikelihood_ratio: float
    p_value: float
    nested: bool
    verdict: Verdict
    alternative_flagged: bool


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """Power-law fit p(x) ~ x^-alpha for x >= xmin, with a bootstrap interval and comparisons.

    Attributes:
      alpha: maximum-likelihood exponent on the tail.
      alpha_ci: (2.5th, 97.5th) percentiles of alpha over the bootstrap replicates; (nan, nan) without any.
      sigma: the package's standard error of alpha, (alpha - 1) / sqrt(n_tail).
      xmin: start of the power-law tail (chosen by minimising the KS distance unless given).
      n_tail: number of samples >= xmin.
      n: number of samples.
      ks_distance: Kolmogorov-Smirnov distance between the tail and the fitted power law.
      discrete: whether the discrete power law was fitted.
      flagged: `powerlaw` flagged the fit: no x_min candidate gave an alpha inside `alpha_range`, or the
        optimiser failed or stopped at the edge of `alpha_range`. Treat alpha with suspicion.
      bootstrap_xmin: "refit" if each replicate chose its own x_min, "fixed" if it reused `xmin`.
      bootstrap_replicates: replicates requested.
      bootstrap_valid: replicates that produced a finite alpha (those the interval is computed from).
      comparisons: alternative name -> Comparison.
    """

    alpha: float
    alpha_ci: tuple[float, float]
    sigma: float
    xmin: float
    n_tail: int
    n: int
    ks_distance: float
    discrete: bool
    flagged: bool
    bootstrap_xmin: BootstrapXmin
    bootstrap_replicates: int
    bootstrap_valid: int
    comparisons: Mapping[str, Comparison]

    def to_summary(self) -> dict[str, Any]:
        """Plain floats, ints, bools and strings for summary.json; one `vs_<alternative>` dict per comparison.

        Non-finite floats stay floats (NaN in JSON), as everywhere in the project's results.
        """
        summary: dict[str, Any] = {
            "exponent": float(self.alpha),
            "sigma": float(self.sigma),
            "ci_low": float(self.alpha_ci[0]),
            "ci_high": float(self.alpha_ci[1]),
            "xmin": float(self.xmin),
            "ks": float(self.ks_distance),
            "n_tail": int(self.n_tail),
            "n": int(self.n),
            "discrete": bool(self.discrete),
            "flagged": bool(self.flagged),
            "bootstrap_xmin": self.bootstrap_xmin,
            "bootstrap_replicates": int(self.bootstrap_replicates),
            "bootstrap_valid": int(self.bootstrap_valid),
        }
        summary["verdict"] = fit_verdict(self)
        for name, comparison in self.comparisons.items():
            summary[f"vs_{name}"] = {
                "R": float(comparison.loglikelihood_ratio),
                "p": float(comparison.p_value),
                "verdict": comparison.verdict,
                "nested": bool(comparison.nested),
                "alternative_flagged": bool(comparison.alternative_flagged),
            }
        return summary


def fit_verdict(fit: PowerLawFit) -> str:
    """One sentence on what the fit supports: which distributions the likelihood-ratio tests favour over the
    power law, and how much of the data the exponent describes. The exponent alone is no evidence of a power law."""
    tail = f"the exponent {fit.alpha:.2f} describes the top {fit.n_tail / max(fit.n, 1):.0%} of neurons"
    favoured = [name for name, c in fit.comparisons.items() if c.verdict == "alternative"]
    beaten = [name for name, c in fit.comparisons.items() if c.verdict == "power_law"]
    undecided = [name for name, c in fit.comparisons.items() if c.verdict == "inconclusive"]
    if favoured:
        line = f"not a power law: {', '.join(favoured)} fits better (p < {SIGNIFICANCE})"
    elif beaten and not undecided:
        line = f"power law favoured over {', '.join(beaten)} (p < {SIGNIFICANCE})"
    elif beaten:
        line = (f"power law favoured over {', '.join(beaten)}; against {', '.join(undecided)} the test cannot tell "
                "(a power law is not established)")
    elif undecided:
        line = f"inconclusive: the data cannot tell a power law from {', '.join(undecided)}"
    else:
        line = "no alternative compared: a power law is not established"
    if fit.flagged:
        line += "; the fit is flagged (alpha at the edge of its range or no x_min candidate)"
    return f"{line}; {tail}"


def comparison_verdict(loglikelihood_ratio: float, p_value: float, significance: float = SIGNIFICANCE) -> Verdict:
    """Which distribution a likelihood-ratio test favours.

    Args:
      loglikelihood_ratio: R, positive when the power law fits better.
      p_value: significance of the sign of R.
      significance: a sign counts only when p_value < significance (CSN's 0.1 by default).

    Returns:
      "power_law" if R > 0 and p < significance, "alternative" if R < 0 and p < significance, otherwise
      (including R = 0 or a nan) "inconclusive".
    """
    if not p_value < significance:
        return "inconclusive"
    if loglikelihood_ratio > 0:
        return "power_law"
    if loglikelihood_ratio < 0:
        return "alternative"
    return "inconclusive"


# ------------------------------------------------------------------------------------------------ samples


def _check_counts(counts) -> np.ndarray:
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.size == 0:
        raise ValueError(f"counts must be a non-empty [L, F] array, got shape {counts.shape}")
    if np.issubdtype(counts.dtype, np.floating):
        if not np.all(np.isfinite(counts)) or np.any(counts != np.round(counts)):
            raise ValueError("counts must hold whole numbers (firing counts), got non-integer values")
    elif not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"counts must hold integers, got dtype {counts.dtype}")
    if np.any(counts < 0):
        raise ValueError(f"counts has negative values (min {counts.min()})")
    return counts.astype(np.int64)


def _select_layer(counts: np.ndarray, layer: int | None) -> np.ndarray:
    if layer is None:
        return counts.reshape(-1)
    n_layers = counts.shape[0]
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not -n_layers <= layer < n_layers:
        raise ValueError(f"layer must be None or an integer in [-{n_layers}, {n_layers}), got {layer!r}")
    return counts[int(layer)]


def firing_frequency_samples(counts: Int[np.ndarray, "L F"], layer: int | None = None) -> Int[np.ndarray, " N"]:
    """The sample to fit: positive per-neuron firing counts of one layer, or of all layers pooled.

    Neurons that never fired are dropped: a power law has no mass at 0 (`silent_neuron_count` says how
    many were dropped). Fit the result with `discrete=True`.

    Args:
      counts: int firing counts [L, F].
      layer: a layer index (negative counts from the end), or None to pool all L * F neurons.

    Returns:
      int64 [N] of the positive counts, in neuron order (layer-major when pooled).
    """
    selected = _select_layer(_check_counts(counts), layer)
    return selected[selected > 0]


def silent_neuron_count(counts: Int[np.ndarray, "L F"], layer: int | None = None) -> int:
    """Number of neurons with a zero count, i.e. those `firing_frequency_samples` drops.

    Args:
      counts: int firing counts [L, F].
      layer: a layer index, or None for all layers.
    """
    return int(np.count_nonzero(_select_layer(_check_counts(counts), layer) == 0))


# ------------------------------------------------------------------------------------------------ fitting


def _powerlaw():
    # Imported on first use: `powerlaw` imports matplotlib.pyplot at import time.
    import powerlaw

    return powerlaw


@contextlib.contextmanager
def _quiet_package() -> Iterator[None]:
    """Silences the noise `powerlaw` makes even with verbose=0, message by message, and nothing else.

    1. Its own x_min search reads its deprecated `Power_Law.sigma` property once per candidate, a
       DeprecationWarning no call of ours can avoid.
    2. Its starting alpha is the continuous closed form even for discrete data, far above the true alpha
       when x_min = 1 (most counts equal 1, so sum(log x) is small); scipy then warns that the start lies
       outside `alpha_range` and clips it into the range, which is the right thing to do.
    3. Its optimisers step through parameters where a normaliser is 0 or nan (e.g. zeta(alpha < 1)) and
       reject them; numpy's floating-point error state is relaxed for that, as np.errstate is meant for.
    4. It advises discrete=True for integer data; fitting large counts (thousands and up) with the
       continuous law is a deliberate choice of the caller.
    """
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        warnings.filterwarnings(
            "ignore", message="Standard error for the MLE should be accessed", category=DeprecationWarning
        )
        warnings.filterwarnings(
            "ignore", message="Initial guess is not within the specified bounds", category=OptimizeWarning
        )
        warnings.filterwarnings("ignore", message="discrete=False but data exclusively contains integer values")
        yield


def _check_samples(samples, discrete: bool) -> np.ndarray:
    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise ValueError(f"samples must be 1-D, got shape {samples.shape}")
    if not (np.issubdtype(samples.dtype, np.integer) or np.issubdtype(samples.dtype, np.floating)):
        raise ValueError(f"samples must hold numbers, got dtype {samples.dtype}")
    samples = samples.astype(np.float64)
    if not np.all(np.isfinite(samples)):
        raise ValueError(f"samples has {np.count_nonzero(~np.isfinite(samples))} non-finite values")
    if np.any(samples <= 0):
        raise ValueError(
            f"samples has {np.count_nonzero(samples <= 0)} values <= 0; a power law has none "
            "(firing_frequency_samples drops silent neurons)"
        )
    if samples.size < MIN_SAMPLES:
        raise ValueError(f"samples has {samples.size} values; a power-law fit needs at least {MIN_SAMPLES}")
    if np.unique(samples).size < 2:
        raise ValueError("samples has a single distinct value; a power law cannot be fitted")
    if discrete and np.any(samples != np.round(samples)):
        raise ValueError("discrete=True but samples has non-integer values")
    return np.sort(samples)


def _check_alpha_range(alpha_range) -> list[float]:
    low, high = (float(v) for v in alpha_range)
    if not 0.0 <= low < high:
        raise ValueError(f"alpha_range must be (low, high) with 0 <= low < high, got {alpha_range!r}")
    return [low, high]


def _tail_power_law(powerlaw, tail: np.ndarray, xmin: float, discrete: bool, alpha_range: list[float], parent=None):
    """powerlaw.Power_Law fitted to tail (all >= xmin) with a fixed xmin, without printing."""
    return powerlaw.Power_Law(
        data=tail,
        xmin=xmin,
        discrete=discrete,
        parameter_ranges={"alpha": alpha_range},
        parent_Fit=parent,
        verbose=0,
    )


def _bootstrap_alphas(
    powerlaw,
    data: np.ndarray,
    *,
    discrete: bool,
    xmin: float,
    mode: BootstrapXmin,
    replicates: int,
    seed: int,
    alpha_range: list[float],
) -> np.ndarray:
    """alpha of each bootstrap replicate [replicates]; nan where a replicate cannot be fitted."""
    rng = np.random.default_rng(seed)
    alphas = np.full(replicates, np.nan)
    for i in range(replicates):
        resample = np.sort(rng.choice(data, size=data.size, replace=True))
        if mode == "refit":
            if np.unique(resample).size < 3:  # x_min search needs 2 candidates below the maximum
                continue
            fit = powerlaw.Fit(resample, discrete=discrete, verbose=0, parameter_ranges={"alpha": alpha_range})
            alphas[i] = fit.alpha
        else:
            tail = resample[resample >= xmin]
            if tail.size < 2 or tail[0] == tail[-1]:
                continue
            alphas[i] = _tail_power_law(powerlaw, tail, xmin, discrete, alpha_range).alpha
    return alphas


def _grid_xmin(powerlaw, data: np.ndarray, discrete: bool, alpha_range: list[float], candidates: int) -> float:
    """The x_min among `candidates` data quantiles whose tail fit has the smallest KS distance (CSN on a grid)."""
    grid = np.unique(np.quantile(data, np.linspace(0.0, 0.99, candidates), method="lower"))
    best, best_distance = float(grid[0]), np.inf
    for candidate in grid:
        tail = data[data >= candidate]
        if tail.size < MIN_SAMPLES or tail[0] == tail[-1]:
            continue
        distance = float(_tail_power_law(powerlaw, tail, float(candidate), discrete, alpha_range).D)
        if distance < best_distance:
            best, best_distance = float(candidate), distance
    return best


def _compare(powerlaw, fit, power_law, name: str, discrete: bool, alpha_range: list[float]) -> Comparison:
    # Built here rather than read as `fit.<name>`, which would ignore verbose=0 and the alpha range (the
    # truncated power law's alpha must live in the same range as the power law's for a nested test).
    alternative = powerlaw.SUPPORTED_DISTRIBUTIONS[name](
        data=fit.data,
        xmin=fit.xmin,
        discrete=discrete,
        parameter_ranges={"alpha": alpha_range},
        parent_Fit=fit,
        verbose=0,
    )
    nested = name in NESTED_ALTERNATIVES
    ratio, p_value = powerlaw.loglikelihood_ratio(
        power_law.loglikelihoods(fit.data), alternative.loglikelihoods(fit.data), nested=nested
    )
    ratio, p_value = float(ratio), float(p_value)
    return Comparison(
        alternative=name,
        loglikelihood_ratio=ratio,
        p_value=p_value,
        nested=nested,
        verdict=comparison_verdict(ratio, p_value),
        alternative_flagged=bool(alternative.noise_flag),
    )


def fit_power_law(
    samples: Real[np.ndarray, " N"],
    *,
    discrete: bool,
    xmin: float | None = None,
    bootstrap: int = 100,
    seed: int = 0,
    alternatives: Sequence[str] = DEFAULT_ALTERNATIVES,
    bootstrap_xmin: BootstrapXmin = "fixed",
    alpha_range: tuple[float, float] = DEFAULT_ALPHA_RANGE,
    xmin_candidates: int | None = 200,
) -> PowerLawFit:
    """Fits p(x) ~ x^-alpha for x >= xmin by the method of Clauset, Shalizi & Newman (2009).

    With the `powerlaw` package (Alstott, Bullmore & Plenz 2014): alpha by maximum likelihood on the tail;
    x_min, unless given, as the data value minimising the KS distance between the tail and its fitted power
    law (every distinct value but the largest is tried: cost ~ distinct values * N, so continuous samples
    with N in the tens of thousands take minutes). For discrete data with x_min >= 10 the package uses
    CSN's closed-form approximation (their eq. 3.7, error ~1%) instead of the exact discrete MLE.

    The interval is a nonparametric bootstrap: resample all N samples with replacement, refit, and take the
    2.5th and 97.5th percentiles of the replicate alphas. With `bootstrap_xmin="refit"` each replicate
    repeats the x_min search, so the interval includes x_min uncertainty (CSN's recipe), at the cost of a
    full fit per replicate: ~0.07 s for one SmolLM2 layer's counts (N = 1536), ~1.7 s for all 30 layers
    pooled (N = 46080) on 2 CPU cores. With "fixed" (default) each replicate keeps the fitted x_min and
    refits alpha on the resampled tail (~1 ms; somewhat narrower, as x_min uncertainty is left out). A
    given `xmin` is always kept fixed.

    Each alternative is compared on the tail by the log-likelihood ratio R (> 0 favours the power law) and
    its p-value; `verdict` names a winner only when p < SIGNIFICANCE = 0.1 (CSN's convention).

    Args:
      samples: positive values [N] (e.g. `firing_frequency_samples(counts)`), at least MIN_SAMPLES, with
        two or more distinct values; integers when `discrete`.
      discrete: fit the discrete power law (integer data such as firing counts) or the continuous one.
      xmin: start of the tail; None to choose it by minimising the KS distance.
      bootstrap: number of bootstrap replicates for `alpha_ci`, >= 0 (0 leaves it (nan, nan)).
      seed: seed of the bootstrap resampling.
      alternatives: names from ALTERNATIVES to compare against.
      bootstrap_xmin: "refit" or "fixed", see above.
      alpha_range: bounds of the fitted alpha; `powerlaw`'s own default (0, 3) would cap steep tails.
      xmin_candidates: with more distinct values than this, x_min is searched over this many quantiles of
        the data (0 to 99%) instead of every distinct value: the exhaustive search took 209 s on SmolLM2's
        46,080 pooled counts, nearly all distinct. None searches every value.

    Returns:
      PowerLawFit.
    """
    data = _check_samples(samples, discrete)
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, numbers.Integral) or bootstrap < 0:
        raise ValueError(f"bootstrap must be a non-negative integer, got {bootstrap!r}")
    if bootstrap_xmin not in ("refit", "fixed"):
        raise ValueError(f"bootstrap_xmin must be 'refit' or 'fixed', got {bootstrap_xmin!r}")
    unknown = [name for name in alternatives if name not in ALTERNATIVES]
    if isinstance(alternatives, str) or unknown:
        raise ValueError(f"alternatives must be a sequence of names from {ALTERNATIVES}, got {alternatives!r}")
    ranges = _check_alpha_range(alpha_range)
    if xmin is not None:
        if not (isinstance(xmin, numbers.Real) and math.isfinite(xmin) and xmin > 0):
            raise ValueError(f"xmin must be a positive finite number or None, got {xmin!r}")
        tail_size = int(np.count_nonzero(data >= xmin))
        if tail_size < MIN_SAMPLES:
            raise ValueError(f"xmin={xmin} leaves {tail_size} samples in the tail; at least {MIN_SAMPLES} needed")

    powerlaw = _powerlaw()
    with _quiet_package():
        if xmin is None and xmin_candidates is not None and np.unique(data).size > xmin_candidates:
            xmin = _grid_xmin(powerlaw, data, discrete, ranges, xmin_candidates)
        fit = powerlaw.Fit(data, discrete=discrete, xmin=xmin, verbose=0, parameter_ranges={"alpha": ranges})
        if not math.isfinite(fit.xmin):
            raise ValueError("powerlaw found no x_min candidate (too few distinct values)")
        power_law = _tail_power_law(powerlaw, fit.data, float(fit.xmin), discrete, ranges, parent=fit)
        mode: BootstrapXmin = "fixed" if xmin is not None else bootstrap_xmin
        alphas = _bootstrap_alphas(
            powerlaw,
            data,
            discrete=discrete,
            xmin=float(fit.xmin),
            mode=mode,
            replicates=int(bootstrap),
            seed=seed,
            alpha_range=ranges,
        )
        comparisons = {
            name: _compare(powerlaw, fit, power_law, name, discrete, ranges) for name in dict.fromkeys(alternatives)
        }

    finite = alphas[np.isfinite(alphas)]
    alpha_ci = (
        (float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))) if finite.size else (math.nan,) * 2
    )
    search_flagged = bool(fit.__dict__.get("noise_flag", False))  # set only when x_min was searched
    return PowerLawFit(
        alpha=float(power_law.alpha),
        alpha_ci=alpha_ci,
        sigma=float(power_law.standard_err),
        xmin=float(fit.xmin),
        n_tail=int(fit.n_tail),
        n=int(data.size),
        ks_distance=float(power_law.D),
        discrete=bool(discrete),
        flagged=search_flagged or bool(power_law.noise_flag),
        bootstrap_xmin=mode,
        bootstrap_replicates=int(bootstrap),
        bootstrap_valid=int(finite.size),
        comparisons=types.MappingProxyType(comparisons),
    )
