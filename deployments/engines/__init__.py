"""The engine registry: which engine serves each model ``kind``, in one place.

A new engine is one module with an :class:`~deployments.engines.base.Engine` subclass, its
config class in ``config.ModelConfig``, and one line here. Engine modules import their heavy
libraries (llama.cpp, vLLM) only inside methods, so the router can read model facts cheaply.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from deployments import constants as C
from deployments.config import ModelConfig
from deployments.engines.base import Engine

_ENGINES: dict[str, str] = {
    "gguf": "deployments.engines.gguf:LlamaCppEngine",
    "vision": "deployments.engines.vision:VLLMEngine",
}


def engine_class(kind: str) -> type[Engine]:
    """The engine class registered for a model ``kind``."""
    try:
        module, _, name = _ENGINES[kind].partition(":")
    except KeyError:
        raise ValueError(f"no engine for model kind {kind!r}; known kinds: {sorted(_ENGINES)}") from None
    return getattr(importlib.import_module(module), name)


def engine_for(config: ModelConfig) -> Engine:
    """A new engine for a model config."""
    return engine_class(config.kind)(config)


def engine_env(config: ModelConfig, cache_dir: Path) -> dict[str, str]:
    """Environment variables a replica of this model needs before its engine is imported.

    vLLM replicas run user code on Serve's own event loop (``SERVE_DATA_PATH_ENV``); llama.cpp
    replicas keep Serve's separate user-code thread: their generation thread holds the GIL
    for llama-cpp-python's per-token Python, and a shared loop then delays Serve's own work
    and ours (measured: decode 27% slower, TTFT +112 ms instead of +24 ms).
    """
    engine = engine_class(config.kind)
    env = engine.replica_env(config, cache_dir)
    return C.SERVE_DATA_PATH_ENV | env if engine.serve_loop_for_user_code else env
