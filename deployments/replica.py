"""The model deployment: one engine per replica, with Serve's lifecycle around it.

Load state is Serve's ``user_config`` (``{"loaded": bool}``): changing it reconfigures
every replica of the model, including replicas that autoscaling starts later, without
restarting them. Generation streams engine deltas back through a Serve streaming handle,
coalesced into one chunk per ``stream_interval_s`` while the engine is fast; when the caller
cancels the handle response, Serve cancels this task and closing the engine stream stops
the engine.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from deployments import constants as C
from deployments.config import ModelConfig
from deployments.engines import engine_env, engine_for
from deployments.engines.base import Delta, Engine, GenerationRequest, ModelInfo, ModelStatus
from deployments.errors import ModelNotLoaded, ServeError
from deployments.metrics import replica_metrics
from deployments.streaming import coalesce

logger = logging.getLogger("ray.serve")

_MODEL_CONFIG = TypeAdapter(ModelConfig)


def deployment_name(model_name: str) -> str:
    """A model's deployment: Serve names must not contain ``#``; keep them readable in ``serve status``."""
    return "model-" + re.sub(r"[^A-Za-z0-9_.-]", "_", model_name)


def model_deployment_options(model: ModelConfig, cache_dir: Path) -> dict[str, Any]:
    """Serve options of a model's deployment: its config over the model defaults.

    A llama.cpp replica runs one generation at a time: its few extra ongoing slots let
    control calls (info, reconfigure) and the next request reach it while it generates. A
    vLLM replica batches many. Serve's caller-side queue, bounded by
    ``max_queued_requests``, holds the rest.
    """
    defaults = {
        "max_ongoing_requests": C.DEFAULT_MODEL_MAX_ONGOING_REQUESTS[model.kind],
        "max_queued_requests": C.DEFAULT_MODEL_MAX_QUEUED_REQUESTS,
        "max_constructor_retry_count": C.DEFAULT_MODEL_MAX_CONSTRUCTOR_RETRY_COUNT,
        "ray_actor_options": {"num_cpus": 1},
    }
    env = engine_env(model, cache_dir)
    return {"user_config": {"loaded": model.loaded}} | model.deployment.serve_options(defaults, env)


class ModelReplica:
    """Serve deployment class for one model (bound once per configured model in ``app``)."""

    def __init__(self, model_config: dict[str, Any], make_engine: Callable[[ModelConfig], Engine] = engine_for):
        self._config = _MODEL_CONFIG.validate_python(model_config)
        self._engine = make_engine(self._config)
        self._status = ModelStatus.UNLOADED
        self._error: str | None = None
        self._lifecycle = asyncio.Lock()
        self._in_flight = 0
        self._last_progress = time.monotonic()
        self._metrics, self._tags = replica_metrics(), {"model": self._config.name}

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply ``{"loaded": bool}``: load or unload the model on this replica."""
        loaded = bool(user_config.get("loaded", True))
        async with self._lifecycle:
            if loaded and self._status is not ModelStatus.LOADED:
                await self._load()
            elif not loaded and self._status is ModelStatus.LOADED:
                await self._engine.unload()
                self._status = ModelStatus.UNLOADED
                logger.info("model %s unloaded", self._config.name)

    async def _load(self) -> None:
        self._status, self._error = ModelStatus.LOADING, None
        try:
            await self._engine.load()
        except ServeError as exc:
            self._status, self._error = ModelStatus.FAILED, exc.message
            raise
        self._status = ModelStatus.LOADED
        logger.info("model %s loaded", self._config.name)

    async def check_health(self) -> None:
        """Serve's health check, aware of progress: raising makes Serve replace this replica."""
        bound = self._config.stall_timeout_s
        silent_s = time.monotonic() - self._last_progress
        if self._in_flight and silent_s > bound:
            raise RuntimeError(
                f"model {self._config.name}: {self._in_flight} request(s) in flight and no token for "
                f"{silent_s:.1f}s (stall_timeout_s={bound:g})"
            )
        if self._status is ModelStatus.LOADED:
            await self._engine.check_health(timeout_s=bound)

    async def info(self) -> ModelInfo:
        return self._engine.info(self._status, self._error)

    async def layer_types(self) -> dict[str, int]:
        """How the weights are stored or quantized on this replica (engine-specific names)."""
        return await self._engine.layer_types()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if self._status is not ModelStatus.LOADED:
            raise ModelNotLoaded(f"model {self._config.name} is not loaded")
        self._in_flight += 1
        if self._in_flight == 1:  # the silence clock runs only while there is work
            self._last_progress = time.monotonic()
        self._report_load()
        try:
            # aclosing: a cancelled task closes the engine stream at once, which stops the engine.
            async with (
                aclosing(self._engine.generate(request)) as deltas,
                aclosing(coalesce(deltas, request.stream_interval_s, Delta.join)) as chunks,
            ):
                async for chunk in chunks:
                    self._last_progress = time.monotonic()
                    yield chunk
        finally:
            self._in_flight -= 1
            self._report_load()

    def _report_load(self) -> None:
        running = min(self._in_flight, self._engine.active_generations() or (1 if self._in_flight else 0))
        self._metrics.requests_running.set(running, self._tags)
        self._metrics.requests_waiting.set(self._in_flight - running, self._tags)
