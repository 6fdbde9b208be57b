"""Shared paths: the demo models the suite runs on (``make models`` generates them)."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


@pytest.fixture(scope="session")
def models_dir() -> Path:
    missing = [p for p in ("tiny-llama-Q4_K_M.gguf", "medium-llama-Q4_K_M.gguf") if not (MODELS / p).exists()]
    if missing:
        pytest.fail(f"demo models missing: {missing}; run `make models`")
    return MODELS
