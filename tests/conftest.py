"""Shared fixtures: the real SmolLM2-135M model, loaded once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, dequantised to f32."""
    from sparse_lm.models.gguf_loader import load_gguf

    return load_gguf()
