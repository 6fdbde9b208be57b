"""``POST /v1/messages`` and ``/v1/messages/count_tokens``: Anthropic's Messages API over the chat
layer. A request becomes the chat request that computes it (``protocol.messages``); its deltas and
tool calls become Anthropic's content blocks and events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from deployments.protocol.chat import ChatCompletionRequest
from deployments.protocol.messages import (
    CountTokensRequest,
    MessageEvents,
    MessagesRequest,
    count_tokens_body,
    message_body,
)
from deployments.serving.chat import ChatServing
from deployments.serving.core import Prepared, ServingCore, parse_request


class MessagesServing:
    def __init__(self, core: ServingCore, chat: ChatServing) -> None:
        self._core = core
        self._chat = chat

    async def prepare(self, body: MessagesRequest, message_id: str) -> Prepared:
        return await self._chat.prepare(parse_request(body.chat_request(), ChatCompletionRequest), message_id)

    async def complete(self, prepared: Prepared, message_id: str) -> dict[str, Any]:
        """One ``message``."""
        ((final, _, calls),) = await self._chat.results(prepared)
        return message_body(message_id, prepared.model.name, final, calls)

    async def stream(self, prepared: Prepared, message_id: str) -> AsyncIterator[dict[str, Any]]:
        """The message's events; ``message_start`` once the engine has answered, so a request it
        refuses is still a real status."""
        events = MessageEvents(message_id, prepared.model.name)
        started = False
        async with aclosing(self._chat.events(prepared)) as chat_events:
            async for _, delta, calls in chat_events:
                if not started:
                    started = True
                    yield events.start()
                for event in events.events(delta, calls):
                    yield event

    async def count_tokens(self, body: CountTokensRequest) -> dict[str, Any]:
        """The prompt's tokens, as the model's replicas render and tokenize it for a message."""
        chat = parse_request(body.chat_request(), ChatCompletionRequest)
        model = self._chat.model(chat)
        timeout = model.deadlines.default.request_timeout_s
        tokens = await self._core.call(model, "tokenize", self._chat.prompt(chat), True, timeout_s=timeout)
        return count_tokens_body(len(tokens))
