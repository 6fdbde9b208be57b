"""Engines: one per model kind, behind the contract in ``engines.base``."""

from __future__ import annotations

from deployments.config import ModelConfig
from deployments.engines.base import Engine


def engine_for(config: ModelConfig) -> Engine:
    """The engine of a model config's ``kind``; heavy engine modules import only when used."""
    if config.kind == "gguf":
        from deployments.engines.gguf import LlamaCppEngine

        return LlamaCppEngine(config)
    raise ValueError(f"no engine for model kind {config.kind!r}")
