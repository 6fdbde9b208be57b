"""``POST /v1/completions``: each prompt as it is (no chat template), ``text_completion`` chunks
or one completion out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from deployments.engines.base import GenerationRequest, Usage
from deployments.errors import InvalidRequest
from deployments.protocol.completions import CompletionRequest, TextChunkFactory, legacy_logprobs, text_completion_body
from deployments.serving.core import Prepared, ServingCore
from deployments.streaming import coalescing_window


class CompletionServing:
    def __init__(self, core: ServingCore) -> None:
        self._core = core

    def prepare(self, body: CompletionRequest, request_id: str) -> Prepared:
        """A text completion: each prompt as it is (no chat template), ``n`` choices each."""
        model = self._core.model(body.model)
        if len(body.prompts) * body.n > self._core.config.router.max_choices:
            raise InvalidRequest(
                f"{len(body.prompts)} prompts x n={body.n} exceed the limit of {self._core.config.router.max_choices} "
                "choices per request (router.max_choices)"
            )
        sampling = self._core.sampling(body, model, body.max_tokens, logprobs=body.logprobs)
        deadlines = self._core.deadlines(body.deadlines, model)
        interval = coalescing_window(model.stream_interval_s, deadlines)
        requests = [
            choice
            for i, prompt in enumerate(body.prompts)
            for choice in self._core.choices_of(
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

    async def stream(self, prepared: Prepared, completion_id: str) -> AsyncIterator[dict[str, Any]]:
        """OpenAI ``text_completion`` chunks (``echo``: each choice's first chunk opens with its prompt)."""
        factory = TextChunkFactory(completion_id, prepared.model.name, prepared.include_usage)
        usages: list[Usage | None] = [None] * len(prepared.requests)
        offsets: list[int | None] = [None] * len(usages)  # where each choice's next text starts
        async with aclosing(self._core.choices(prepared)) as choices:
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

    async def complete(self, prepared: Prepared, completion_id: str) -> dict[str, Any]:
        """One OpenAI ``text_completion`` dict."""
        asked = prepared.request.sampling.logprobs is not None
        choices, usages = [], []
        for index, (final, logprobs) in enumerate(await self._core.collect(prepared)):
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
