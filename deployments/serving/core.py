"""The serving core every API shares: resolve the model, build the engine requests, run them
under deadlines, merge the choices.

Each API (``serving.chat``, ``serving.completions``, ``serving.embeddings``) only translates its
request into :class:`Prepared` engine requests and the deltas that come back into its own events.
No FastAPI here: the HTTP routes and the Python handle API in ``router`` both call these, so
streaming and non-streaming, HTTP and handles, share one path to the engines.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.config import AppConfig, Deadlines, ModelConfig
from deployments.engines.base import Delta, GenerationRequest, Priority, SamplingParams, TokenLogprob, Usage
from deployments.errors import InferenceTimeout, InvalidRequest, ModelNotFound, ServeError, as_serve_error
from deployments.metrics import router_metrics
from deployments.protocol.common import GenerationFields
from deployments.streaming import with_deadlines
from deployments.tools import ToolUse


def new_request_id(prefix: str = "chatcmpl") -> str:
    """The completion id: Serve's request id (echoed as ``x-request-id``, in every log line)."""
    context = serve.context._get_serve_request_context()
    return f"{prefix}-{context.request_id or uuid.uuid4().hex}"


R = TypeVar("R", bound=BaseModel)


def parse_request(
    raw: bytes | str | Mapping[str, Any] | R,
    kind: type[R],
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


def cancel(response: DeploymentResponseGenerator) -> None:
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

    def background(self) -> Prepared:
        """As background work (a batch line): its engine requests yield to interactive ones for as
        long as those keep coming, so no deadline runs; its batch's window bounds it, and a stalled
        engine fails its replica's health check (``stall_timeout_s``) and the line runs again."""
        requests = tuple(r.model_copy(update={"priority": Priority.BACKGROUND}) for r in self.requests)
        return replace(self, requests=requests, deadlines=Deadlines())

    def usage(self, usages: Sequence[Usage | None]) -> Usage:
        """The request's usage: each prompt counted once (its ``n`` choices share it)."""
        firsts = [u for u in usages[:: self.n] if u is not None]
        return Usage(
            sum(u.prompt_tokens for u in firsts),
            sum(u.completion_tokens for u in usages if u is not None),
            sum(u.cached_tokens for u in firsts),
        )


class ServingCore:
    """The models of one app and the handles of their deployments."""

    def __init__(self, config: AppConfig, handles: Mapping[str, DeploymentHandle]) -> None:
        self.config = config
        self.models = {m.name: m for m in config.models}
        self.handles = dict(handles)
        # Generation streams over Serve's gRPC data path (by value), not one Ray object per chunk.
        self._streams = {name: h.options(stream=True, _by_reference=False) for name, h in handles.items()}

    # -- the request -------------------------------------------------------------------

    def model(self, name: str, embeddings: bool = False) -> ModelConfig:
        """The model called ``name``, if it serves this kind of call (embeddings, or text)."""
        model = self._named(name)
        if model.serves_embeddings != embeddings:
            others = sorted(m.name for m in self.config.models if m.serves_embeddings == embeddings)
            what = "POST /v1/embeddings" if embeddings else "chat and text completions"
            raise InvalidRequest(
                f"model {name} does not serve {what}; "
                + (f"models that do: {', '.join(others)}" if others else "no configured model does"),
                code="embeddings_not_supported" if embeddings else "model_serves_embeddings",
            )
        return model

    def any_model(self, name: str | None) -> ModelConfig:
        """The model called ``name``, of any kind; unnamed, the app's only model (llama-server's
        own calls name none)."""
        if name is not None:
            return self._named(name)
        if len(self.models) > 1:
            raise InvalidRequest(f"model: required, this app serves several: {', '.join(sorted(self.models))}")
        return next(iter(self.models.values()))

    def _named(self, name: str) -> ModelConfig:
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(f"model {name!r} not found; available models: {', '.join(sorted(self.models))}")
        return model

    def sampling(
        self, body: GenerationFields, model: ModelConfig, max_tokens: int | None, **options: Any
    ) -> SamplingParams:
        """The request's sampling options over the model's defaults."""
        max_tokens = max_tokens or model.sampling.max_tokens
        if max_tokens >= model.context_size:
            raise InvalidRequest(
                f"max_tokens={max_tokens} must be below the context size of model {model.name} ({model.context_size})"
            )
        limit = self.config.router.max_choices
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
    def choices_of(request: GenerationRequest, n: int) -> list[GenerationRequest]:
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

    @staticmethod
    def deadlines(requested: Deadlines, model: ModelConfig) -> Deadlines:
        """The request's deadlines over the model's defaults; one above the model's maximum is a 400."""
        for name, value in requested.model_dump(exclude_none=True).items():
            bound = getattr(model.deadlines.maximum, name)
            if bound is not None and value > bound:
                raise InvalidRequest(f"{name}={value:g} exceeds the maximum of {bound:g} for model {model.name}")
        return requested.merged_over(model.deadlines.default)

    # -- calls -------------------------------------------------------------------------

    async def call(self, model: ModelConfig, method: str, *args: Any, timeout_s: float) -> Any:
        """One unary call to the model's replicas within ``timeout_s``, its errors classified."""
        response = getattr(self.handles[model.name], method).remote(*args)
        try:
            return await asyncio.wait_for(response, timeout_s)
        except TimeoutError:
            cancel(response)
            raise InferenceTimeout(
                f"model {model.name} did not answer within request_timeout_s={timeout_s:g}"
            ) from None
        except ServeError:
            raise
        except Exception as exc:
            raise as_serve_error(exc) from exc

    # -- generation --------------------------------------------------------------------

    async def deltas(self, prepared: Prepared, request: GenerationRequest) -> AsyncIterator[Delta]:
        """One choice's deltas under the request's deadlines; cancels the replica on early exit."""
        metrics, tags = router_metrics(), {"model": prepared.model.name, "priority": request.priority.name.lower()}
        started = last = time.perf_counter()
        first = True
        response = None
        outcome = "cancelled"  # unless the stream finishes or fails: the consumer went away
        try:
            # Inside the try: a full queue raises BackPressureError right here.
            response = self._streams[prepared.model.name].generate.remote(request)
            async for delta in with_deadlines(response, prepared.deadlines, on_expire=lambda: cancel(response)):
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
                cancel(response)

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

    async def collect(self, prepared: Prepared) -> list[tuple[Delta, list[TokenLogprob]]]:
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
            out.append((Delta("".join(text), final.finish_reason, final.usage, stop_sequence=final.stop_sequence), lps))
        return out
