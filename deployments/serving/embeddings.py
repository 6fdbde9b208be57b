"""``POST /v1/embeddings``: one call to the model's replicas, within the request's deadline."""

from __future__ import annotations

from typing import Any

from deployments.protocol.embeddings import EmbeddingRequest, embeddings_body
from deployments.serving.core import ServingCore


class EmbeddingServing:
    def __init__(self, core: ServingCore) -> None:
        self._core = core

    async def embed(self, body: EmbeddingRequest) -> dict[str, Any]:
        """One OpenAI embeddings list, within the request's deadline."""
        model = self._core.model(body.model, embeddings=True)
        deadline = self._core.deadlines(body.deadlines, model).request_timeout_s
        embeddings = await self._core.call(model, "embed", body.inputs, timeout_s=deadline)
        return embeddings_body(model.name, embeddings, body.encoding_format)
