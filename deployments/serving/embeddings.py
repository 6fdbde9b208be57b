"""``POST /v1/embeddings``: one call to the model's replicas, within the request's deadline."""

from __future__ import annotations

import asyncio
from typing import Any

from deployments.errors import InferenceTimeout, ServeError, as_serve_error
from deployments.protocol.embeddings import EmbeddingRequest, embeddings_body
from deployments.serving.core import ServingCore, cancel


class EmbeddingServing:
    def __init__(self, core: ServingCore) -> None:
        self._core = core

    async def embed(self, body: EmbeddingRequest) -> dict[str, Any]:
        """One OpenAI embeddings list, within the request's deadline."""
        model = self._core.model(body.model, embeddings=True)
        deadline = self._core.deadlines(body.deadlines, model).request_timeout_s
        response = self._core.handles[model.name].embed.remote(body.inputs)
        try:
            embeddings = await asyncio.wait_for(response, deadline)
        except TimeoutError:
            cancel(response)
            raise InferenceTimeout(f"no embeddings within request_timeout_s={deadline:g}") from None
        except ServeError:
            raise
        except Exception as exc:
            raise as_serve_error(exc) from exc
        return embeddings_body(model.name, embeddings, body.encoding_format)
