"""A batch line answered through the same serving path as its HTTP request, as background work."""

from __future__ import annotations

from typing import Any

from deployments.errors import InvalidRequest
from deployments.protocol.chat import ChatCompletionRequest
from deployments.protocol.completions import CompletionRequest
from deployments.protocol.embeddings import EmbeddingRequest
from deployments.serving.chat import ChatServing
from deployments.serving.completions import CompletionServing
from deployments.serving.core import ServingCore, parse_request
from deployments.serving.embeddings import EmbeddingServing


class BatchServing:
    def __init__(self, core: ServingCore) -> None:
        self._chat = ChatServing(core)
        self._completions = CompletionServing(core)
        self._embeddings = EmbeddingServing(core)

    async def answer(self, endpoint: str, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        """The response body ``endpoint`` gives ``body`` over HTTP; raises ``ServeError`` as it would.

        Generations run as background work (``Prepared.background``). Embeddings are one short
        call each and run as they come, bounded by the runner's concurrency per model.
        """
        if body.get("stream"):
            raise InvalidRequest("stream: a batch line cannot stream; remove the field")
        if endpoint == "/v1/chat/completions":
            chat = parse_request(body, ChatCompletionRequest)
            prepared = await self._chat.prepare(chat, request_id)
            return await self._chat.complete(prepared.background(), request_id)
        if endpoint == "/v1/completions":
            text = parse_request(body, CompletionRequest)
            prepared = self._completions.prepare(text, request_id)
            return await self._completions.complete(prepared.background(), request_id)
        if endpoint == "/v1/embeddings":
            return await self._embeddings.embed(parse_request(body, EmbeddingRequest))
        raise InvalidRequest(f"endpoint {endpoint} is not served in batches")
