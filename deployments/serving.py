"""Chat serving logic: validate, route to a model deployment, stream under deadlines.

No FastAPI here: the HTTP routes and the Python handle API in ``router`` both call this,
so streaming and non-streaming, HTTP and handles, share one path to the engines.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.config import AppConfig, Deadlines, ModelConfig
from deployments.constants import MODEL_INFO_TIMEOUT_S
from deployments.engines import engine_class
from deployments.engines.base import (
    Delta,
    GenerationRequest,
    JsonOutput,
    ModelFacts,
    ModelInfo,
    ModelStatus,
    SamplingParams,
    TokenLogprob,
    Usage,
)
from deployments.errors import (
    InferenceTimeout,
    InvalidRequest,
    ModelNotFound,
    ServeError,
    as_serve_error,
)
from deployments.images import load_image
from deployments.metrics import router_metrics
from deployments.protocol import (
    ChatCompletionRequest,
    ChunkFactory,
    CompletionRequest,
    EmbeddingRequest,
    GenerationFields,
    TextChunkFactory,
    chat_choice,
    completion_body,
    embeddings_body,
    json_output,
    legacy_logprobs,
    model_card,
    text_completion_body,
)
from deployments.replica import deployment_name
from deployments.streaming import coalescing_window, with_deadlines
from deployments.tools import ToolCall, ToolCallFilter, ToolUse


def new_request_id(prefix: str = "chatcmpl") -> str:
    """The completion id: Serve's request id (echoed as ``x-request-id``, in every log line)."""
    context = serve.context._get_serve_request_context()
    return f"{prefix}-{context.request_id or uuid.uuid4().hex}"


R = TypeVar("R", bound=GenerationFields | EmbeddingRequest)


def parse_request(
    raw: bytes | str | Mapping[str, Any] | R,
    kind: type[R] = ChatCompletionRequest,  # type: ignore[assignment]
) -> R:
    """Validate a request body; every problem becomes one 400 naming the fields to fix."""
    if isinstance(raw, kind):
        return raw
    try:
        if isinstance(raw, bytes | str):
            return kind.model_validate_json(raw)
        return kind.model_validate(raw)
    except ValidationError as exc:
        raise InvalidRequest(_describe_validation_error(exc)) from None


def _describe_validation_error(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "body"
        if error["type"] == "json_invalid":
            problems.append(f"the request body is not valid JSON ({error['ctx']['error']})")
        elif error["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown field")
        elif not error["loc"]:  # a rule over several fields: its message names them
            problems.append(error["msg"])
        else:
            problems.append(f"{where}: {error['msg']}")
    return "invalid request: " + "; ".join(problems)


def _deployment_state(deployment: str) -> tuple[ModelStatus, str | None]:
    """A model deployment's state from Serve's controller, for when no replica can say."""
    app = serve.get_replica_context().app_name
    state = serve.status().applications[app].deployments.get(deployment)
    if state is None or state.status in ("UPDATING", "UPSCALING"):
        return ModelStatus.LOADING, (state.message or None) if state else None
    return ModelStatus.FAILED, state.message or f"deployment {deployment} is {state.status}"


def _facts(model: ModelConfig) -> ModelFacts:
    """What the model's files say, for its card while no replica answers; the router's node may
    lack the files (they need only be where the model's replicas run), or one may be unreadable."""
    try:
        return engine_class(model.kind).describe(model)
    except Exception:
        return ModelFacts(model.path.stem, model.path.stat().st_size if model.path.is_file() else 0, None)


# Engine stats that describe one replica rather than add up over replicas: the highest is shown.
_PER_REPLICA_STATS = frozenset({"parallel", "kv_cache_usage_perc", "peak_batch_size"})


def _merge_stats(reports: list[dict[str, float]]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for stats in reports:
        for name, value in stats.items():
            merged[name] = (
                max(merged.get(name, value), value) if name in _PER_REPLICA_STATS else merged.get(name, 0) + value
            )
    return merged


def _cancel(response: DeploymentResponseGenerator) -> None:
    """Cancel a handle call; never raises (``cancel`` re-raises a failed call's error)."""
    try:
        response.cancel()
    except Exception:  # the call already failed; its error is being reported
        pass


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated request bound to its model: one engine request per choice, ``n`` per prompt."""

    model: ModelConfig
    requests: tuple[GenerationRequest, ...]
    n: int
    deadlines: Deadlines
    include_usage: bool
    tools: ToolUse | None = None  # chat: its calls are parsed out of each answer
    echo: tuple[str, ...] = ()  # text completions: each prompt, put before its choices' text

    @property
    def request(self) -> GenerationRequest:
        return self.requests[0]

    def usage(self, usages: Sequence[Usage | None]) -> Usage:
        """The request's usage: each prompt counted once (its ``n`` choices share it)."""
        firsts = [u for u in usages[:: self.n] if u is not None]
        return Usage(
            sum(u.prompt_tokens for u in firsts),
            sum(u.completion_tokens for u in usages if u is not None),
            sum(u.cached_tokens for u in firsts),
        )


class ChatService:
    def __init__(self, config: AppConfig, handles: Mapping[str, DeploymentHandle]) -> None:
        self._config = config
        self._models = {m.name: m for m in config.models}
        self._handles = dict(handles)
        # Generation streams over Serve's gRPC data path (by value), not one Ray object per chunk.
        self._streams = {name: h.options(stream=True, _by_reference=False) for name, h in handles.items()}
        self._facts = {m.name: _facts(m) for m in config.models}
        self._created = int(time.time())

    # -- validation --------------------------------------------------------------------

    def _model(self, name: str, embeddings: bool = False) -> ModelConfig:
        """The model called ``name``, if it serves this kind of call (embeddings, or text)."""
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(f"model {name!r} not found; available models: {', '.join(sorted(self._models))}")
        if model.serves_embeddings != embeddings:
            others = sorted(m.name for m in self._config.models if m.serves_embeddings == embeddings)
            what = "POST /v1/embeddings" if embeddings else "chat and text completions"
            raise InvalidRequest(
                f"model {name} does not serve {what}; "
                + (f"models that do: {', '.join(others)}" if others else "no configured model does"),
                code="embeddings_not_supported" if embeddings else "model_serves_embeddings",
            )
        return model

    def _sampling(
        self, body: GenerationFields, model: ModelConfig, max_tokens: int | None, **options: Any
    ) -> SamplingParams:
        """The request's sampling options over the model's defaults."""
        max_tokens = max_tokens or model.sampling.max_tokens
        if max_tokens >= model.context_size:
            raise InvalidRequest(
                f"max_tokens={max_tokens} must be below the context size of model {model.name} ({model.context_size})"
            )
        limit = self._config.router.max_choices
        if body.n > limit:
            raise InvalidRequest(f"n={body.n} exceeds the limit of {limit} choices per request (router.max_choices)")
        return SamplingParams(
            temperature=model.sampling.temperature if body.temperature is None else body.temperature,
            top_p=model.sampling.top_p if body.top_p is None else body.top_p,
            top_k=model.sampling.top_k if body.top_k is None else body.top_k,
            max_tokens=max_tokens,
            stop=tuple(body.stop or ()),
            seed=body.seed,
            ignore_eos=body.ignore_eos,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            min_p=body.min_p or 0.0,
            logit_bias=tuple((body.logit_bias or {}).items()),
            **options,
        )

    @staticmethod
    def _choices(request: GenerationRequest, n: int) -> list[GenerationRequest]:
        """``n`` choices of one prompt: seeded ones get seeds of their own (else all would agree)."""
        if n == 1:
            return [request]
        seed = request.sampling.seed
        return [
            request.model_copy(
                update={
                    "request_id": f"{request.request_id}-{i}",
                    "sampling": request.sampling.model_copy(update={"seed": None if seed is None else seed + i}),
                }
            )
            for i in range(n)
        ]

    async def prepare(self, body: ChatCompletionRequest, request_id: str, *, require_images: bool = False) -> Prepared:
        model = self._model(body.model)
        if (body.has_images or require_images) and not model.supports_vision:
            vision = sorted(m.name for m in self._config.models if m.supports_vision)
            raise InvalidRequest(
                f"model {model.name} does not accept images; "
                + (f"models that do: {', '.join(vision)}" if vision else "no configured model accepts images"),
                code="images_not_supported",
            )
        if require_images and not body.has_images:
            raise InvalidRequest("this call needs at least one image (an image_url content part)")
        if len(body.messages) > self._config.router.max_messages:
            raise InvalidRequest(f"too many messages: {len(body.messages)} > {self._config.router.max_messages}")
        if body.ignore_eos and body.response_format and body.response_format.type != "text":
            raise InvalidRequest("ignore_eos cannot be combined with a JSON response_format: the JSON must end")
        tools = body.tool_use()
        schema = tools.call_schema() if tools else None  # required and named calls are constrained
        sampling = self._sampling(
            body,
            model,
            body.max_completion_tokens or body.max_tokens,
            json_output=JsonOutput(json_schema=schema) if schema is not None else json_output(body.response_format),
            logprobs=body.logprobs_top,
        )
        deadlines = self._deadlines(body, model)
        request = GenerationRequest(
            request_id=request_id,
            messages=tuple(m.engine_message() for m in body.messages),
            tools=tools.template_tools() if tools else (),
            images=await self._images(body, model),
            sampling=sampling,
            stream_interval_s=coalescing_window(model.stream_interval_s, deadlines),
        )
        return Prepared(model, tuple(self._choices(request, body.n)), body.n, deadlines, body.include_usage, tools)

    def prepare_text(self, body: CompletionRequest, request_id: str) -> Prepared:
        """A text completion: each prompt as it is (no chat template), ``n`` choices each."""
        model = self._model(body.model)
        if len(body.prompts) * body.n > self._config.router.max_choices:
            raise InvalidRequest(
                f"{len(body.prompts)} prompts x n={body.n} exceed the limit of {self._config.router.max_choices} "
                "choices per request (router.max_choices)"
            )
        sampling = self._sampling(body, model, body.max_tokens, logprobs=body.logprobs)
        deadlines = self._deadlines(body, model)
        interval = coalescing_window(model.stream_interval_s, deadlines)
        requests = [
            choice
            for i, prompt in enumerate(body.prompts)
            for choice in self._choices(
                GenerationRequest(
                    request_id=request_id if len(body.prompts) == 1 else f"{request_id}-p{i}",
                    prompt=prompt,
                    sampling=sampling,
                    stream_interval_s=interval,
                ),
                body.n,
            )
        ]
        echo = tuple(body.prompts) if body.echo else ()
        return Prepared(model, tuple(requests), body.n, deadlines, body.include_usage, echo=echo)

    async def _images(self, body: ChatCompletionRequest, model: ModelConfig) -> tuple[bytes, ...]:
        """Every image of the request, verified, in message order (1-based index in errors)."""
        parts = [part for message in body.messages for part in message.images]
        if not parts:
            return ()
        limits = self._config.router.images
        limit = min(limits.max_images, model.max_images)
        if len(parts) > limit:
            raise InvalidRequest(f"{len(parts)} images exceed the limit of {limit} per request for model {model.name}")
        try:
            return tuple(
                await asyncio.gather(*(load_image(p.image_url.url, i, limits) for i, p in enumerate(parts, start=1)))
            )
        except InvalidRequest:
            router_metrics().image_decode_failures.inc()
            raise

    @staticmethod
    def _deadlines(body: GenerationFields | EmbeddingRequest, model: ModelConfig) -> Deadlines:
        requested = Deadlines(
            first_chunk_timeout_s=getattr(body, "first_chunk_timeout_s", None),
            chunk_timeout_s=getattr(body, "chunk_timeout_s", None),
            request_timeout_s=body.request_timeout_s,
        )
        for name, value in requested.model_dump(exclude_none=True).items():
            bound = getattr(model.deadlines.maximum, name)
            if bound is not None and value > bound:
                raise InvalidRequest(f"{name}={value:g} exceeds the maximum of {bound:g} for model {model.name}")
        return requested.merged_over(model.deadlines.default)

    # -- generation --------------------------------------------------------------------

    async def deltas(self, prepared: Prepared, request: GenerationRequest) -> AsyncIterator[Delta]:
        """One choice's deltas under the request's deadlines; cancels the replica on early exit."""
        metrics, tags = router_metrics(), {"model": prepared.model.name}
        started = last = time.perf_counter()
        first = True
        response = None
        outcome = "cancelled"  # unless the stream finishes or fails: the consumer went away
        try:
            # Inside the try: a full queue raises BackPressureError right here.
            response = self._streams[prepared.model.name].generate.remote(request)
            async for delta in with_deadlines(response, prepared.deadlines, on_expire=lambda: _cancel(response)):
                now = time.perf_counter()
                (metrics.time_to_first_token if first else metrics.inter_token_latency).observe(now - last, tags)
                first, last = False, now
                if delta.usage is not None:  # Ray's counters refuse 0: an answer may end at its first token
                    if delta.usage.prompt_tokens:
                        metrics.prompt_tokens.inc(delta.usage.prompt_tokens, tags)
                    if delta.usage.completion_tokens:
                        metrics.generation_tokens.inc(delta.usage.completion_tokens, tags)
                yield delta
            outcome = "finished"
            metrics.e2e_request_latency.observe(time.perf_counter() - started, tags)
        except InferenceTimeout as exc:
            outcome = "failed"
            metrics.deadline_expirations.inc(tags={**tags, "reason": exc.code})
            raise
        except ServeError:
            outcome = "failed"
            raise
        except Exception as exc:
            outcome = "failed"
            raise as_serve_error(exc) from exc
        finally:
            if outcome == "cancelled":
                metrics.cancellations.inc(tags=tags)
            if response is not None and outcome != "finished":  # stop the engine too
                _cancel(response)

    async def choices(self, prepared: Prepared) -> AsyncIterator[tuple[int, Delta]]:
        """Every choice's deltas as they come, tagged with the choice's index; the first
        failure ends them all (the others are cancelled, in the engine too)."""
        if len(prepared.requests) == 1:
            async with aclosing(self.deltas(prepared, prepared.request)) as deltas:
                async for delta in deltas:
                    yield 0, delta
            return
        queue: asyncio.Queue[tuple[int, Delta | BaseException | None]] = asyncio.Queue()

        async def pump(index: int, request: GenerationRequest) -> None:
            try:
                async with aclosing(self.deltas(prepared, request)) as deltas:
                    async for delta in deltas:
                        queue.put_nowait((index, delta))
            except Exception as exc:
                queue.put_nowait((index, exc))
            finally:
                queue.put_nowait((index, None))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(prepared.requests)]
        try:
            running = len(tasks)
            while running:
                index, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def stream(self, prepared: Prepared, completion_id: str) -> AsyncIterator[dict[str, Any]]:
        """OpenAI ``chat.completion.chunk`` dicts."""
        factory = ChunkFactory(completion_id, prepared.model.name, prepared.include_usage)
        filters = [ToolCallFilter(prepared.tools) if prepared.tools else None for _ in prepared.requests]
        usages: list[Usage | None] = [None] * len(prepared.requests)
        async with aclosing(self.choices(prepared)) as choices:
            async for index, delta in choices:
                calls: list[ToolCall] = []
                if (calls_filter := filters[index]) is not None:
                    delta, calls = calls_filter.filter(delta)
                usages[index] = delta.usage or usages[index]
                for chunk in factory.chunks(delta, calls, index):
                    yield chunk
        if prepared.include_usage:
            yield factory.usage_chunk(prepared.usage(usages))

    async def _collect(self, prepared: Prepared) -> list[tuple[Delta, list[TokenLogprob]]]:
        """Each choice whole: (its text, finish reason and usage as one delta; its logprobs)."""
        parts: list[list[str]] = [[] for _ in prepared.requests]
        logprobs: list[list[TokenLogprob]] = [[] for _ in prepared.requests]
        finals: list[Delta | None] = [None] * len(prepared.requests)
        async with aclosing(self.choices(prepared)) as choices:
            async for index, delta in choices:
                parts[index].append(delta.text)
                logprobs[index].extend(delta.logprobs)
                if delta.finish_reason is not None:
                    finals[index] = delta
        out = []
        for text, final, lps in zip(parts, finals, logprobs, strict=True):
            # The replica ends every stream with its final delta, or raises (Engine.generate's contract).
            assert final is not None and final.finish_reason is not None and final.usage is not None
            out.append((Delta("".join(text), final.finish_reason, final.usage), lps))
        return out

    async def complete(self, prepared: Prepared, completion_id: str) -> dict[str, Any]:
        """One OpenAI ``chat.completion`` dict."""
        asked = prepared.request.sampling.logprobs is not None
        choices, usages = [], []
        for index, (final, logprobs) in enumerate(await self._collect(prepared)):
            calls: list[ToolCall] = []
            if prepared.tools is not None:
                final, calls = ToolCallFilter(prepared.tools).filter(final)
            choices.append(chat_choice(index, final, logprobs if asked else None, calls))
            usages.append(final.usage)
        return completion_body(completion_id, prepared.model.name, choices, prepared.usage(usages))

    async def stream_text(self, prepared: Prepared, completion_id: str) -> AsyncIterator[dict[str, Any]]:
        """OpenAI ``text_completion`` chunks (``echo``: each choice's first chunk opens with its prompt)."""
        factory = TextChunkFactory(completion_id, prepared.model.name, prepared.include_usage)
        usages: list[Usage | None] = [None] * len(prepared.requests)
        offsets: list[int | None] = [None] * len(usages)  # where each choice's next text starts
        async with aclosing(self.choices(prepared)) as choices:
            async for index, delta in choices:
                usages[index] = delta.usage or usages[index]
                text, offset = delta.text, offsets[index]
                if offset is None:
                    echo = prepared.echo[index // prepared.n] if prepared.echo else ""
                    text, offset = echo + text, len(echo)
                logprobs = legacy_logprobs(delta.logprobs, offset) if delta.logprobs else None
                offsets[index] = offset + len(delta.text)
                if text or delta.finish_reason or logprobs:
                    yield factory.chunk(index, text, delta.finish_reason, logprobs)
        if prepared.include_usage:
            yield factory.usage_chunk(prepared.usage(usages))

    async def complete_text(self, prepared: Prepared, completion_id: str) -> dict[str, Any]:
        """One OpenAI ``text_completion`` dict."""
        asked = prepared.request.sampling.logprobs is not None
        choices, usages = [], []
        for index, (final, logprobs) in enumerate(await self._collect(prepared)):
            prompt = prepared.echo[index // prepared.n] if prepared.echo else ""
            choices.append(
                {
                    "index": index,
                    "text": prompt + final.text,
                    "logprobs": legacy_logprobs(logprobs, 0) if asked else None,
                    "finish_reason": final.finish_reason,
                }
            )
            usages.append(final.usage)
        return text_completion_body(completion_id, prepared.model.name, choices, prepared.usage(usages))

    async def embed(self, body: EmbeddingRequest) -> dict[str, Any]:
        """One OpenAI embeddings list, within the request's deadline."""
        model = self._model(body.model, embeddings=True)
        deadline = self._deadlines(body, model).request_timeout_s
        response = self._handles[model.name].embed.remote(body.inputs)
        try:
            embeddings = await asyncio.wait_for(response, deadline)
        except TimeoutError:
            _cancel(response)
            raise InferenceTimeout(f"no embeddings within request_timeout_s={deadline:g}") from None
        except ServeError:
            raise
        except Exception as exc:
            raise as_serve_error(exc) from exc
        return embeddings_body(model.name, embeddings, body.encoding_format)

    # -- models ------------------------------------------------------------------------

    async def list_models(self) -> list[dict[str, Any]]:
        infos = await asyncio.gather(*(self._model_info(m) for m in self._config.models))
        return [model_card(info, self._created) for info in infos]

    async def _model_info(self, model: ModelConfig) -> ModelInfo:
        """Merge the replicas' reports: one card per model, generations summed."""
        try:
            reports = (
                await self._handles[model.name]
                .broadcast("info")
                .results_async(timeout_s=MODEL_INFO_TIMEOUT_S, return_exceptions=True)
            )
        except Exception as exc:  # no replica running (starting, failed) or no answer in time
            reports = [exc]
        infos = [r for r in reports if isinstance(r, ModelInfo)]
        if not infos:  # no replica answered: ask Serve why (starting, failed to load, ...)
            status, error = await asyncio.to_thread(_deployment_state, deployment_name(model.name))
            return ModelInfo.describe(model, self._facts[model.name], status, error=error)
        replicas: dict[ModelStatus, int] = {}
        for info in infos:
            for status, count in info.replicas.items():
                replicas[status] = replicas.get(status, 0) + count
        active = sum(i.active_generations for i in infos)
        return infos[0].model_copy(
            update={
                "engine_stats": _merge_stats([i.engine_stats for i in infos]),
                "status": next(iter(replicas)) if len(replicas) == 1 else ModelStatus.MIXED,
                "replicas": replicas,
                "active_generations": active,
                "idle_since": None if active else max((i.idle_since for i in infos if i.idle_since), default=None),
                "error": next((i.error for i in infos if i.error), None),
            }
        )
