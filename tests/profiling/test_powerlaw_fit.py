"""Power-law fits on seeded synthetic samples with known exponents and known non-power-law shapes."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from sparse_lm.profiling.powerlaw_fit import (
    Comparison,
    PowerLawFit,
    comparison_verdict,
    firing_frequency_samples,
    fit_power_law,
    silent_neuron_count,
)

TRUE_ALPHA = 2.5


def continuous_power_law(alpha: float, xmin: float, n: int, seed: int) -> np.ndarray:
    """Inverse-CDF samples of p(x) ~ x^-alpha on [xmin, inf)."""
    u = np.random.default_rng(seed).random(n)
    return xmin * (1.0 - u) ** (-1.0 / (alpha - 1.0))


@pytest.fixture(scope="module")
def continuous_fit() -> PowerLawFit:
    samples = continuous_power_law(TRUE_ALPHA, xmin=1.0, n=3000, seed=0)
    return fit_power_law(samples, discrete=False, bootstrap=50, seed=0, alternatives=("lognormal", "exponential"))


@pytest.fixture(scope="module")
def zipf_samples() -> np.ndarray:
    return np.random.default_rng(0).zipf(TRUE_ALPHA, size=3000)


@pytest.fixture(scope="module")
def zipf_fit(zipf_samples) -> PowerLawFit:
    return fit_power_law(zipf_samples, discrete=True, bootstrap=50, seed=0)


# ------------------------------------------------------------------------------------------------ known alpha


def test_continuous_power_law_recovers_alpha(continuous_fit):
    assert continuous_fit.alpha == pytest.approx(TRUE_ALPHA, rel=0.05)
    low, high = continuous_fit.alpha_ci
    assert low < TRUE_ALPHA < high
    assert low < continuous_fit.alpha < high
    assert continuous_fit.xmin == pytest.approx(1.0, rel=0.1)  # the whole sample is the tail
    assert continuous_fit.n == 3000 and continuous_fit.n_tail > 2700
    assert continuous_fit.sigma == pytest.approx((continuous_fit.alpha - 1) / math.sqrt(continuous_fit.n_tail))
    assert 0 < continuous_fit.ks_distance < 0.05
    assert not continuous_fit.flagged and not continuous_fit.discrete
    assert continuous_fit.bootstrap_xmin == "fixed" and continuous_fit.bootstrap_valid == 50


def test_continuous_power_law_beats_exponential(continuous_fit):
    versus = continuous_fit.comparisons["exponential"]
    assert versus.loglikelihood_ratio > 0 and versus.p_value < 0.1 and versus.verdict == "power_law"
    assert not versus.nested


def test_discrete_zipf_recovers_alpha(zipf_fit):
    assert zipf_fit.discrete
    assert zipf_fit.alpha == pytest.approx(TRUE_ALPHA, rel=0.05)
    assert zipf_fit.alpha_ci[0] < TRUE_ALPHA < zipf_fit.alpha_ci[1]
    assert zipf_fit.xmin == 1.0 and zipf_fit.n_tail == 3000
    assert zipf_fit.comparisons["exponential"].verdict == "power_law"
    nested = zipf_fit.comparisons["truncated_power_law"]
    assert nested.nested and nested.verdict != "alternative"  # no cutoff in a pure power law


def test_refit_bootstrap_also_covers_alpha(zipf_samples):
    fit = fit_power_law(zipf_samples, discrete=True, bootstrap=20, seed=1, bootstrap_xmin="refit", alternatives=())
    assert fit.bootstrap_xmin == "refit" and fit.bootstrap_valid == 20
    assert fit.alpha_ci[0] < TRUE_ALPHA < fit.alpha_ci[1]


def test_bootstrap_is_seeded(zipf_samples):
    kwargs = dict(discrete=True, bootstrap=20, alternatives=())
    first = fit_power_law(zipf_samples, seed=3, **kwargs)
    assert fit_power_law(zipf_samples, seed=3, **kwargs).alpha_ci == first.alpha_ci
    assert fit_power_law(zipf_samples, seed=4, **kwargs).alpha_ci != first.alpha_ci


def test_no_bootstrap_gives_nan_interval(zipf_samples):
    fit = fit_power_law(zipf_samples, discrete=True, bootstrap=0, alternatives=())
    assert all(math.isnan(bound) for bound in fit.alpha_ci) and fit.bootstrap_valid == 0
    assert fit.comparisons == {}


def test_steep_tail_is_not_capped_at_three():
    # powerlaw's default alpha range (0, 3) would pin this at ~2.85 on a 46-sample tail, without a flag.
    samples = np.random.default_rng(0).zipf(3.5, size=3000)
    fit = fit_power_law(samples, discrete=True, bootstrap=0, alternatives=())
    assert fit.alpha == pytest.approx(3.5, rel=0.05) and fit.n_tail == 3000
    capped = fit_power_law(samples, discrete=True, bootstrap=0, alternatives=(), alpha_range=(0.0, 3.0))
    assert capped.alpha < 3.0 and capped.n_tail < 300


def test_given_xmin_is_kept(zipf_samples):
    fit = fit_power_law(zipf_samples, discrete=True, xmin=3, bootstrap=10, bootstrap_xmin="refit", alternatives=())
    assert fit.xmin == 3.0 and fit.n_tail == int(np.count_nonzero(zipf_samples >= 3))
    assert fit.bootstrap_xmin == "fixed"
    assert fit.alpha == pytest.approx(TRUE_ALPHA, rel=0.05)


# ------------------------------------------------------------------------------------------------ alternatives


def test_lognormal_sample_does_not_favour_power_law():
    samples = np.random.default_rng(0).lognormal(mean=0.0, sigma=1.0, size=3000)
    versus = fit_power_law(samples, discrete=False, bootstrap=0, alternatives=("lognormal",)).comparisons["lognormal"]
    assert versus.loglikelihood_ratio < 0 and versus.verdict in ("alternative", "inconclusive")
    # Over the whole sample, not just the KS-chosen tail, the lognormal wins outright.
    whole = fit_power_law(samples, discrete=False, xmin=float(samples.min()), bootstrap=0, alternatives=("lognormal",))
    assert whole.comparisons["lognormal"].verdict == "alternative"


def test_exponential_sample_does_not_favour_power_law():
    samples = np.random.default_rng(0).exponential(scale=10.0, size=3000)
    versus = fit_power_law(samples, discrete=False, bootstrap=0, alternatives=("exponential",))
    assert versus.comparisons["exponential"].loglikelihood_ratio < 0
    assert versus.comparisons["exponential"].verdict in ("alternative", "inconclusive")
    # Exponential tails are exponential above any point: above the median the exponential wins outright.
    upper = fit_power_law(
        samples, discrete=False, xmin=float(np.median(samples)), bootstrap=0, alternatives=("exponential",)
    )
    assert upper.comparisons["exponential"].verdict == "alternative"


@pytest.mark.parametrize(
    ("ratio", "p_value", "verdict"),
    [
        (5.0, 0.01, "power_law"),
        (-5.0, 0.01, "alternative"),
        (5.0, 0.1, "inconclusive"),  # the threshold is strict: p < 0.1
        (-5.0, 0.5, "inconclusive"),
        (0.0, 0.0, "inconclusive"),
        (math.nan, 0.01, "inconclusive"),
        (5.0, math.nan, "inconclusive"),
    ],
)
def test_comparison_verdict(ratio, p_value, verdict):
    assert comparison_verdict(ratio, p_value) == verdict


# ------------------------------------------------------------------------------------------------ summary


def test_to_summary_is_plain_json(zipf_fit):
    summary = zipf_fit.to_summary()
    assert summary["exponent"] == zipf_fit.alpha
    assert (summary["ci_low"], summary["ci_high"]) == zipf_fit.alpha_ci
    assert summary["xmin"] == 1.0 and summary["n_tail"] == 3000 and summary["ks"] == zipf_fit.ks_distance
    versus: Comparison = zipf_fit.comparisons["lognormal"]
    assert summary["vs_lognormal"] == {
        "R": versus.loglikelihood_ratio,
        "p": versus.p_value,
        "verdict": versus.verdict,
        "nested": False,
        "alternative_flagged": versus.alternative_flagged,
    }
    assert set(summary) >= {"vs_lognormal", "vs_exponential", "vs_truncated_power_law"}
    assert json.loads(json.dumps(summary)) == summary


def test_fit_is_silent(zipf_samples, capsys):
    steep = np.random.default_rng(0).zipf(3.5, size=3000)  # the package's start alpha is out of range here
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_power_law(zipf_samples, discrete=True, bootstrap=5, bootstrap_xmin="refit")
        fit_power_law(steep, discrete=True, bootstrap=5, alternatives=("lognormal", "truncated_power_law"))
    assert [str(w.message) for w in caught] == []
    assert capsys.readouterr() == ("", "")


# ------------------------------------------------------------------------------------------------ samples


def test_firing_frequency_samples_drop_zeros():
    counts = np.array([[0, 5, 2, 0], [7, 0, 0, 1]])
    np.testing.assert_array_equal(firing_frequency_samples(counts), [5, 2, 7, 1])
    np.testing.assert_array_equal(firing_frequency_samples(counts, layer=1), [7, 1])
    np.testing.assert_array_equal(firing_frequency_samples(counts, layer=-2), [5, 2])
    assert silent_neuron_count(counts) == 4
    assert silent_neuron_count(counts, layer=0) == 2
    assert firing_frequency_samples(counts.astype(np.float64)).dtype == np.int64


def test_firing_frequency_samples_validation():
    with pytest.raises(ValueError, match="layer"):
        firing_frequency_samples(np.ones((2, 3), dtype=int), layer=2)
    with pytest.raises(ValueError, match="counts"):
        firing_frequency_samples(np.ones(3, dtype=int))
    with pytest.raises(ValueError, match="counts"):
        firing_frequency_samples(np.array([[1, -1]]))
    with pytest.raises(ValueError, match="counts"):
        firing_frequency_samples(np.array([[1.5, 2.0]]))


# ------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        (np.arange(1, 6), "at least 10"),
        (np.array([1.0, 2.0, np.inf] + [3.0] * 10), "non-finite"),
        (np.array([1.0, np.nan] + [3.0] * 10), "non-finite"),
        (np.array([0, 1, 2] + [3] * 10), "<= 0"),
        (np.full(20, 4), "single distinct value"),
        (np.ones((4, 4)), "1-D"),
    ],
)
def test_fit_rejects_bad_samples(samples, message):
    with pytest.raises(ValueError, match=message):
        fit_power_law(samples, discrete=True)


def test_fit_rejects_bad_arguments(zipf_samples):
    with pytest.raises(ValueError, match="non-integer"):
        fit_power_law(continuous_power_law(2.5, 1.0, 50, seed=0), discrete=True)
    with pytest.raises(ValueError, match="bootstrap must"):
        fit_power_law(zipf_samples, discrete=True, bootstrap=-1)
    with pytest.raises(ValueError, match="bootstrap_xmin"):
        fit_power_law(zipf_samples, discrete=True, bootstrap_xmin="sometimes")
    with pytest.raises(ValueError, match="alternatives"):
        fit_power_law(zipf_samples, discrete=True, alternatives=("gamma",))
    with pytest.raises(ValueError, match="alternatives"):
        fit_power_law(zipf_samples, discrete=True, alternatives="lognormal")
    with pytest.raises(ValueError, match="xmin"):
        fit_power_law(zipf_samples, discrete=True, xmin=-1.0)
    with pytest.raises(ValueError, match="xmin"):
        fit_power_law(zipf_samples, discrete=True, xmin=float(zipf_samples.max()))
    with pytest.raises(ValueError, match="alpha_range"):
        fit_power_law(zipf_samples, discrete=True, alpha_range=(3.0, 2.0))


def test_verdict_names_the_favoured_alternative_and_the_tail_share():
    from sparse_lm.profiling.powerlaw_fit import Comparison, PowerLawFit, fit_verdict

    def fit(**verdicts):
        comparisons = {name: Comparison(name, -1.0 if v == "alternative" else 1.0, 0.01 if v != "inconclusive" else 0.5,
                                        False, v, False) for name, v in verdicts.items()}
        return PowerLawFit(alpha=4.18, alpha_ci=(4.0, 4.3), sigma=0.1, xmin=10.0, n_tail=120, n=1000, ks_distance=0.02,
                           discrete=True, flagged=False, bootstrap_xmin="fixed", bootstrap_replicates=0,
                           bootstrap_valid=0, comparisons=comparisons)

    line = fit_verdict(fit(lognormal="alternative", exponential="power_law"))
    assert line.startswith("not a power law: lognormal fits better")
    assert line.endswith("the exponent 4.18 describes the top 12% of neurons")
    assert fit_verdict(fit(lognormal="power_law", exponential="power_law")).startswith(
        "power law favoured over lognormal, exponential")
    assert "a power law is not established" in fit_verdict(fit(lognormal="inconclusive", exponential="power_law"))
    assert fit_verdict(fit(lognormal="inconclusive")).startswith("inconclusive")
