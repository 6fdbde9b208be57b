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
import math
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from deployments import constants as C
from deployments.config import ModelConfig
from deployments.engines import engine_class, engine_env, engine_for
from deployments.engines.base import (
    Delta,
    Embeddings,
    Engine,
    GenerationRequest,
    ModelInfo,
    ModelStatus,
    Priority,
    Prompt,
)
from deployments.errors import InferenceFailed, ModelLoadFailed, ModelNotLoaded, ServeError
from deployments.metrics import ENGINE_COUNTERS, replica_metrics
from deployments.streaming import coalesce

logger = logging.getLogger("ray.serve")

_MODEL_CONFIG = TypeAdapter(ModelConfig)


def deployment_name(model_name: str) -> str:
    """A model's deployment: Serve names must not contain ``#``; keep them readable in ``serve status``."""
    return "model-" + re.sub(r"[^A-Za-z0-9_.-]", "_", model_name)


def model_deployment_options(model: ModelConfig, cache_dir: Path) -> dict[str, Any]:
    """Serve options of a model's deployment: its config over the model defaults.

    Each engine says what one replica reserves (``placement``: a parallel vLLM replica's group of
    workers), how many requests one replica takes at once (a batching llama.cpp replica:
    its ``parallel`` sequences and a few more) and what autoscaling should aim for per replica;
    Serve's caller-side queue, bounded by ``max_queued_requests``, holds the rest.
    """
    engine = engine_class(model.kind)
    defaults = {
        "max_ongoing_requests": engine.max_ongoing_requests(model),
        "max_queued_requests": C.DEFAULT_MODEL_MAX_QUEUED_REQUESTS,
        "max_constructor_retry_count": C.DEFAULT_MODEL_MAX_CONSTRUCTOR_RETRY_COUNT,
        "ray_actor_options": {"num_cpus": 1},
    }
    options = model.deployment.serve_options(defaults, engine_env(model, cache_dir))
    options |= engine.placement(model, options["ray_actor_options"]).serve_options()
    target = engine.target_ongoing_requests(model)
    if "autoscaling_config" in options and target is not None:
        options["autoscaling_config"] = {"target_ongoing_requests": target} | options["autoscaling_config"]
    return {"user_config": {"loaded": model.loaded}} | options


class ModelReplica:
    """Serve deployment class for one model (bound once per configured model in ``app``)."""

    def __init__(self, model_config: dict[str, Any], make_engine: Callable[[ModelConfig], Engine] = engine_for):
        self._config = _MODEL_CONFIG.validate_python(model_config)
        self._engine = make_engine(self._config)
        self._status = ModelStatus.UNLOADED
        self._error: str | None = None
        self._lifecycle = asyncio.Lock()
        self._in_flight = 0
        # Background work (batch lines) enters the engine only while no interactive request is in flight.
        self._interactive = 0
        self._no_interactive = asyncio.Event()
        self._no_interactive.set()
        self._preemption = asyncio.Event()  # set, and replaced, when an interactive request arrives
        self._background_waits = self._preemptions = 0
        self._interactive_ended = -math.inf  # time.monotonic() when the last interactive request ended
        prefills = self._config.background_prefills
        self._prefills = asyncio.Semaphore(prefills) if prefills is not None else None
        self._last_progress = time.monotonic()
        self._metrics, self._tags = replica_metrics(), {"model": self._config.name}
        self._counted = dict.fromkeys(ENGINE_COUNTERS, 0.0)  # counter values published so far
        self._publisher: asyncio.Task[None] | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply ``{"loaded": bool}``: load or unload the model on this replica."""
        loaded = bool(user_config.get("loaded", True))
        async with self._lifecycle:
            if loaded and self._status is not ModelStatus.LOADED:
                await self._load()
            elif not loaded and self._status is ModelStatus.LOADED:
                # First: new requests are refused, and streams the unload ends can say why.
                self._status = ModelStatus.UNLOADED
                await self._engine.unload()
                self._counted = dict.fromkeys(self._counted, 0.0)  # a new engine counts from zero
                logger.info("model %s unloaded", self._config.name)

    async def _load(self) -> None:
        self._status, self._error = ModelStatus.LOADING, None
        try:
            await self._engine.load()
        except Exception as exc:
            error = (
                exc if isinstance(exc, ServeError) else ModelLoadFailed(f"loading failed: {type(exc).__name__}: {exc}")
            )
            self._status, self._error = ModelStatus.FAILED, error.message
            raise error from exc
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

    async def placement(self) -> dict[str, Any]:
        """Where this replica runs: its placement group (a parallel model's) and the model's workers."""
        from ray.util import get_current_placement_group

        group = get_current_placement_group()
        self._require_loaded()
        return {
            "pid": os.getpid(),
            "placement_group": None if group is None else group.id.hex(),
            "bundles": None if group is None else group.bundle_specs,
            "workers": await self._engine.workers(),
        }

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """The engine's stream, coalesced, under the contract of ``Engine.generate``.

        This is the one place the contract is enforced for every engine and every caller: a
        stream that ends without its final delta (finish reason and usage) raises instead, so
        no client ever reads a silently truncated answer as a complete one.

        Background work (a batch line) only takes what interactive requests leave: it starts
        while none is in flight on this replica, is preempted (stopped in the engine) when one
        arrives, and runs again from its start once they are gone; so it comes back whole, as
        one delta.
        """
        self._require_loaded()
        if request.priority is Priority.BACKGROUND:
            yield await self._background(request)
            return
        self._interactive += 1
        if self._interactive == 1:
            self._no_interactive.clear()
            self._preemption.set()
            self._preemption = asyncio.Event()
        try:
            async with aclosing(self._stream(request)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self._interactive -= 1
            if not self._interactive:
                self._interactive_ended = time.monotonic()
                self._no_interactive.set()

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        self._in_flight += 1
        if self._in_flight == 1:  # the silence clock runs only while there is work
            self._last_progress = time.monotonic()
        if self._publisher is None:
            self._publisher = asyncio.get_running_loop().create_task(self._publish_periodically())
        self._report_load()
        last: Delta | None = None
        try:
            # aclosing: a cancelled task closes the engine stream at once, which stops the engine.
            async with (
                aclosing(self._engine.generate(request)) as deltas,
                aclosing(coalesce(deltas, request.stream_interval_s, Delta.join)) as chunks,
            ):
                async for last in chunks:
                    self._last_progress = time.monotonic()
                    yield last
            if last is None or last.finish_reason is None or last.usage is None:
                raise self._interrupted()
        finally:
            self._in_flight -= 1
            self._report_load()

    async def _background(self, request: GenerationRequest) -> Delta:
        """A background generation, whole, in the time interactive requests leave."""
        while True:
            if not self._no_interactive.is_set():
                self._background_waits += 1
                await self._no_interactive.wait()
                self._require_loaded()
            preempted = asyncio.ensure_future(self._preemption.wait())
            run = asyncio.ensure_future(self._whole(request))
            try:
                await asyncio.wait((run, preempted), return_when=asyncio.FIRST_COMPLETED)
            finally:
                preempted.cancel()
                if not run.done():
                    run.cancel()  # closes the engine stream: the engine drops the sequence
                    await asyncio.gather(run, return_exceptions=True)
            if not run.cancelled():
                return run.result()
            self._preemptions += 1

    async def _whole(self, request: GenerationRequest) -> Delta:
        """The whole generation; at most ``background_prefills`` of them process their prompt at once
        while interactive requests come (one ended within ``background_prefills_window_s``)."""
        parts: list[Delta] = []
        recent = time.monotonic() - self._interactive_ended < self._config.background_prefills_window_s
        prefilling = self._prefills if recent else None
        if prefilling is not None:
            await prefilling.acquire()
        try:
            async with aclosing(self._stream(request)) as chunks:
                async for chunk in chunks:
                    if prefilling is not None:  # its first token: the prompt is done
                        prefilling.release()
                        prefilling = None
                    parts.append(chunk)
        finally:
            if prefilling is not None:
                prefilling.release()
        return Delta.join(parts)

    async def priorities(self) -> dict[str, int]:
        """Interactive requests in flight; how often background work waited for them, and was preempted."""
        return {
            "interactive": self._interactive,
            "background_waits": self._background_waits,
            "preemptions": self._preemptions,
        }

    async def embed(self, inputs: list[str | list[int]]) -> Embeddings:
        """One vector per input (models configured for embeddings)."""
        self._require_loaded()
        self._in_flight += 1
        self._report_load()
        try:
            return await self._engine.embed(inputs)
        finally:
            self._in_flight -= 1
            self._last_progress = time.monotonic()
            self._report_load()

    async def tokenize(self, prompt: Prompt, add_special: bool = True) -> list[int]:
        """The token ids a generation from ``prompt`` starts with (``Engine.tokenize``)."""
        self._require_loaded()
        return await self._engine.tokenize(prompt, add_special)

    async def detokenize(self, tokens: list[int]) -> str:
        self._require_loaded()
        return await self._engine.detokenize(tokens)

    def _require_loaded(self) -> None:
        if self._status is not ModelStatus.LOADED:
            raise ModelNotLoaded(f"model {self._config.name} is not loaded")

    def _interrupted(self) -> ServeError:
        """Why an engine stream ended without its final delta."""
        name = self._config.name
        if self._status is not ModelStatus.LOADED:
            return ModelNotLoaded(f"model {name} was unloaded during the generation; retry", code="model_unloaded")
        logger.error("model %s: the engine ended a stream without a finish reason", name)
        return InferenceFailed(f"model {name} ended the generation without finishing it", code="generation_incomplete")

    def _report_load(self) -> None:
        """Running: sequences the engine decodes (its own count); waiting: the rest of this replica's requests."""
        stats = self._engine.stats()
        running = min(self._in_flight, int(stats.get("running", self._engine.active_generations())))
        self._metrics.requests_running.set(running, self._tags)
        self._metrics.requests_waiting.set(self._in_flight - running, self._tags)
        if "kv_cache_usage_perc" in stats:
            self._metrics.kv_cache_usage_perc.set(stats["kv_cache_usage_perc"], self._tags)
            self._metrics.batch_size.set(stats["batch_size"], self._tags)
        for name, published in self._counted.items():
            if stats.get(name, published) > published:
                metric, labels = ENGINE_COUNTERS[name]
                getattr(self._metrics, metric).inc(stats[name] - published, self._tags | labels)
                self._counted[name] = stats[name]

    async def _publish_periodically(self) -> None:
        """The engine's counters move every step: publish them once per interval, not per token."""
        while True:
            await asyncio.sleep(C.METRICS_INTERVAL_S)
            self._report_load()
