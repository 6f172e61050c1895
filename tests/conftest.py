"""Shared fixtures: the real SmolLM2-135M model, loaded once per session; the figure script of analysis/."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ANALYSIS_DIR = Path(__file__).resolve().parents[1] / "analysis"


@pytest.fixture(scope="session")
def make_figures():
    """analysis/make_figures.py imported as Python runs the script: with its folder first on sys.path, so its
    sibling modules (figure_registry, figures_train) import; analysis/ is scripts, not a package."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ANALYSIS_DIR))
        return importlib.import_module("make_figures")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, dequantised to f32."""
    from sparse_lm.models.gguf_loader import load_gguf

    return load_gguf()
