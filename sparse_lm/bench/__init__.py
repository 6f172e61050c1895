"""Benchmarks (not tests): speed measured side by side in one run, with the physical floor beside it."""
