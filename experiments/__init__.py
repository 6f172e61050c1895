"""Hydra entry points: each composes a config from `conf/` and calls a `sparse_lm.<task>.run`."""
