"""Shared fixtures: the real SmolLM2-135M model, loaded once per session; the figure script of analysis/; a
small text file for tiny end-to-end runs."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ANALYSIS_DIR = Path(__file__).resolve().parents[1] / "analysis"
SAMPLE_TEXT = Path(__file__).resolve().parent / "fixtures" / "pydocs_sample" / "tutorial" / "interactive.rst.txt"


@pytest.fixture()
def text_file(tmp_path) -> Path:
    """A ~20 KB UTF-8 text file (a Python tutorial page, three times) for the textfile corpus."""
    path = tmp_path / "text.txt"
    path.write_text(SAMPLE_TEXT.read_text() * 3)
    return path


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
