"""``POST /v1/chat/completions`` (and the handle API's ``infer*``): messages in, the chat
template's engine requests, ``chat.completion`` chunks or one completion out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from deployments.config import ModelConfig
from deployments.engines.base import Delta, GenerationRequest, JsonOutput, Prompt, TokenLogprob, Usage
from deployments.errors import InvalidRequest
from deployments.images import load_image
from deployments.metrics import router_metrics
from deployments.protocol.chat import ChatCompletionRequest, ChunkFactory, chat_choice, completion_body, json_output
from deployments.serving.core import Prepared, ServingCore
from deployments.streaming import coalescing_window
from deployments.tools import ToolCall, ToolCallFilter


class ChatServing:
    def __init__(self, core: ServingCore) -> None:
        self._core = core

    def model(self, body: ChatCompletionRequest, *, require_images: bool = False) -> ModelConfig:
        """The request's model, if it can take the request's messages (images, their number)."""
        model = self._core.model(body.model)
        if (body.has_images or require_images) and not model.supports_vision:
            vision = sorted(m.name for m in self._core.config.models if m.supports_vision)
            raise InvalidRequest(
                f"model {model.name} does not accept images; "
                + (f"models that do: {', '.join(vision)}" if vision else "no configured model accepts images"),
                code="images_not_supported",
            )
        if require_images and not body.has_images:
            raise InvalidRequest("this call needs at least one image (an image_url content part)")
        if len(body.messages) > self._core.config.router.max_messages:
            raise InvalidRequest(f"too many messages: {len(body.messages)} > {self._core.config.router.max_messages}")
        return model

    @staticmethod
    def prompt(body: ChatCompletionRequest) -> Prompt:
        """The messages and tools the chat template renders (images' bytes apart: ``prepare`` loads them)."""
        tools = body.tool_use()
        return Prompt(
            messages=tuple(m.engine_message() for m in body.messages), tools=tools.template_tools() if tools else ()
        )

    async def prepare(self, body: ChatCompletionRequest, request_id: str, *, require_images: bool = False) -> Prepared:
        model = self.model(body, require_images=require_images)
        if body.ignore_eos and body.response_format and body.response_format.type != "text":
            raise InvalidRequest("ignore_eos cannot be combined with a JSON response_format: the JSON must end")
        tools = body.tool_use()
        schema = tools.call_schema() if tools else None  # required and named calls are constrained
        sampling = self._core.sampling(
            body,
            model,
            body.max_completion_tokens or body.max_tokens,
            json_output=JsonOutput(json_schema=schema) if schema is not None else json_output(body.response_format),
            logprobs=body.logprobs_top,
        )
        deadlines = self._core.deadlines(body.deadlines, model)
        prompt = self.prompt(body)
        request = GenerationRequest(
            request_id=request_id,
            messages=prompt.messages,
            tools=prompt.tools,
            images=await self._images(body, model),
            sampling=sampling,
            stream_interval_s=coalescing_window(model.stream_interval_s, deadlines),
        )
        return Prepared(
            model, tuple(self._core.choices_of(request, body.n)), body.n, deadlines, body.include_usage, tools
        )

    async def _images(self, body: ChatCompletionRequest, model: ModelConfig) -> tuple[bytes, ...]:
        """Every image of the request, verified, in message order (1-based index in errors)."""
        parts = [part for message in body.messages for part in message.images]
        if not parts:
            return ()
        limits = self._core.config.router.images
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

    async def events(self, prepared: Prepared) -> AsyncIterator[tuple[int, Delta, list[ToolCall]]]:
        """Each choice's deltas as they come, with the tool calls parsed out of its text: what
        every API over chat (chat completions, Messages, Responses) turns into its own events."""
        filters = [ToolCallFilter(prepared.tools) if prepared.tools else None for _ in prepared.requests]
        async with aclosing(self._core.choices(prepared)) as choices:
            async for index, delta in choices:
                calls: list[ToolCall] = []
                if (calls_filter := filters[index]) is not None:
                    delta, calls = calls_filter.filter(delta)
                yield index, delta, calls

    async def results(self, prepared: Prepared) -> list[tuple[Delta, list[TokenLogprob], list[ToolCall]]]:
        """Each choice whole: its text, finish reason and usage as one delta; its logprobs; its calls."""
        out = []
        for final, logprobs in await self._core.collect(prepared):
            calls: list[ToolCall] = []
            if prepared.tools is not None:
                final, calls = ToolCallFilter(prepared.tools).filter(final)
            out.append((final, logprobs, calls))
        return out

    async def stream(self, prepared: Prepared, completion_id: str) -> AsyncIterator[dict[str, Any]]:
        """OpenAI ``chat.completion.chunk`` dicts."""
        factory = ChunkFactory(completion_id, prepared.model.name, prepared.include_usage)
        usages: list[Usage | None] = [None] * len(prepared.requests)
        async with aclosing(self.events(prepared)) as events:
            async for index, delta, calls in events:
                usages[index] = delta.usage or usages[index]
                for chunk in factory.chunks(delta, calls, index):
                    yield chunk
        if prepared.include_usage:
            yield factory.usage_chunk(prepared.usage(usages))

    async def complete(self, prepared: Prepared, completion_id: str) -> dict[str, Any]:
        """One OpenAI ``chat.completion`` dict."""
        asked = prepared.request.sampling.logprobs is not None
        results = await self.results(prepared)
        choices = [
            chat_choice(index, final, logprobs if asked else None, calls)
            for index, (final, logprobs, calls) in enumerate(results)
        ]
        usage = prepared.usage([final.usage for final, _, _ in results])
        return completion_body(completion_id, prepared.model.name, choices, usage)
