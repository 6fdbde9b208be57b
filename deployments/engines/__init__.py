"""Engines: one per model kind, behind the contract in ``engines.base``."""

from __future__ import annotations

from pathlib import Path

from deployments import constants as C
from deployments.config import ModelConfig
from deployments.engines.base import Engine


def engine_for(config: ModelConfig) -> Engine:
    """The engine of a model config's ``kind``; heavy engine modules import only when used."""
    if config.kind == "gguf":
        from deployments.engines.gguf import LlamaCppEngine

        return LlamaCppEngine(config)
    if config.kind == "vision":
        from deployments.engines.vision import VLLMEngine

        return VLLMEngine(config)
    raise ValueError(f"no engine for model kind {config.kind!r}")


def engine_env(config: ModelConfig, cache_dir: Path) -> dict[str, str]:
    """Environment variables a replica of this model needs before its engine is imported.

    vLLM replicas run user code on Serve's own event loop (``SERVE_DATA_PATH_ENV``); llama.cpp
    replicas keep Serve's separate user-code thread: their generation thread holds the GIL
    for llama-cpp-python's per-token Python, and a shared loop then delays Serve's own work
    and ours (measured: decode 27% slower, TTFT +112 ms instead of +24 ms).
    """
    if config.kind == "vision":
        from deployments.engines.vision import replica_env

        return C.SERVE_DATA_PATH_ENV | replica_env(config, cache_dir)
    return {}
