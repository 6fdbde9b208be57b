"""``POST /v1/embeddings``: texts or token ids in, one vector each out."""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from deployments import constants as C
from deployments.config import Deadlines
from deployments.engines.base import Embeddings
from deployments.protocol.common import Strict


class EmbeddingRequest(Strict):
    """``POST /v1/embeddings``: texts or token-id lists, one vector each."""

    model: str
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="One text, texts, one token-id list, or token-id lists."
    )
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None
    request_timeout_s: float | None = Field(default=None, gt=0, description="Our extension: the call's deadline.")

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("dimensions") is not None:
            raise PydanticCustomError("not_supported", "dimensions: not supported by this server")
        return {k: v for k, v in data.items() if k != "dimensions"} if isinstance(data, dict) else data

    @property
    def deadlines(self) -> Deadlines:
        return Deadlines(request_timeout_s=self.request_timeout_s)

    @property
    def inputs(self) -> list[str | list[int]]:
        """One entry per vector asked for."""
        if isinstance(self.input, str):
            return [self.input]
        if self.input and all(isinstance(i, int) for i in self.input):
            return [self.input]  # type: ignore[list-item]
        return list(self.input)  # type: ignore[arg-type]

    @field_validator("input")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        if isinstance(value, list) and not 0 < len(value) <= C.MAX_EMBEDDING_INPUTS:
            raise ValueError(f"takes 1 to {C.MAX_EMBEDDING_INPUTS} inputs")
        return value


def embeddings_body(model: str, embeddings: Embeddings, encoding_format: str) -> dict[str, Any]:
    """OpenAI's list of ``embedding`` objects; base64 is the little-endian float32 bytes."""

    def encode(vector: np.ndarray) -> list[float] | str:
        if encoding_format == "base64":
            return base64.b64encode(vector.astype("<f4").tobytes()).decode()
        return vector.tolist()

    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(vector)}
            for i, vector in enumerate(embeddings.vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": embeddings.prompt_tokens, "total_tokens": embeddings.prompt_tokens},
    }
