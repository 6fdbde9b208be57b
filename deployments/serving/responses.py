"""``POST /v1/responses``: OpenAI's Responses API over the chat layer. A request becomes the chat
request that computes it (``protocol.responses``); its deltas and tool calls become the
response's output items and its stream's events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from deployments.errors import as_serve_error
from deployments.protocol.chat import ChatCompletionRequest
from deployments.protocol.responses import ResponseBuilder, ResponsesRequest
from deployments.serving.chat import ChatServing
from deployments.serving.core import Prepared, parse_request


class ResponsesServing:
    def __init__(self, chat: ChatServing) -> None:
        self._chat = chat

    async def prepare(self, body: ResponsesRequest, response_id: str) -> Prepared:
        return await self._chat.prepare(parse_request(body.chat_request(), ChatCompletionRequest), response_id)

    async def complete(self, prepared: Prepared, body: ResponsesRequest, response_id: str) -> dict[str, Any]:
        """One ``response`` object."""
        ((final, _, calls),) = await self._chat.results(prepared)
        return ResponseBuilder(response_id, prepared.model.name, body).whole(final, calls)

    async def stream(
        self, prepared: Prepared, body: ResponsesRequest, response_id: str
    ) -> AsyncIterator[dict[str, Any]]:
        """The response's events: ``response.created`` once the engine has answered (so a request
        it refuses is still a real status); a later failure ends the stream with ``error`` and
        ``response.failed``."""
        builder = ResponseBuilder(response_id, prepared.model.name, body)
        started = False
        async with aclosing(self._chat.events(prepared)) as chat_events:
            try:
                async for _, delta, calls in chat_events:
                    if not started:
                        started = True
                        for event in builder.start():
                            yield event
                    for event in builder.events(delta, calls):
                        yield event
            except Exception as exc:
                if not started:
                    raise
                for event in builder.failed(as_serve_error(exc)):
                    yield event
