"""Activation profiling: firing rules, the streaming profiler, firing statistics and power-law fits."""

from sparse_lm.profiling.counts import CountsFileError, FiringCounts
from sparse_lm.profiling.firing import FiringConfig, FiringRule, fire_mask
from sparse_lm.profiling.powerlaw_fit import PowerLawFit, firing_frequency_samples, fit_power_law
from sparse_lm.profiling.profiler import calibrate_thresholds, collect_abs_activations, profile_sequences

__all__ = [
    "CountsFileError",
    "FiringConfig",
    "FiringCounts",
    "FiringRule",
    "PowerLawFit",
    "calibrate_thresholds",
    "collect_abs_activations",
    "fire_mask",
    "firing_frequency_samples",
    "fit_power_law",
    "profile_sequences",
]
