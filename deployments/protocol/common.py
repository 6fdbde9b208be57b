"""What the APIs' request and response models share: strictness, content parts, the generation
fields, usage, chunk streams, model cards and SSE framing.

Only protocol lives in this package: no FastAPI, no Serve. Unknown request fields are rejected so
a misspelt option is an error the client sees, not a silently ignored setting. Each API has a
module of its own (``chat``, ``completions``, ``embeddings``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator
from pydantic_core import PydanticCustomError

from deployments import constants as C
from deployments.config import Deadlines
from deployments.engines.base import ModelInfo, Usage
from deployments.errors import ServeError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageURL(Strict):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class StreamOptions(Strict):
    include_usage: bool = False


UNSET_VALUES = (None, False, [], {})


class GenerationFields(Strict):
    """What chat and text completions share: model, sampling, streaming, our extensions (``extra_body``)."""

    # OpenAI fields this server cannot honour: a request that sets one gets a 400 saying so,
    # never an answer that silently ignores it.
    UNSUPPORTED_FIELDS: ClassVar[tuple[str, ...]] = ()

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    max_tokens: PositiveInt | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: PositiveInt = Field(default=1, description="Choices per prompt (bounded by router.max_choices).")
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[int, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        default=None, description="Token id -> bias added to its logit."
    )
    # Fields that describe the caller, not the answer: accepted, not acted on (as vLLM does).
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: Literal[False] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # Extensions: sampling options of vLLM and llama.cpp, exact lengths, deadlines.
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    ignore_eos: bool = False
    first_chunk_timeout_s: float | None = Field(default=None, gt=0)
    chunk_timeout_s: float | None = Field(default=None, gt=0)
    request_timeout_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        """Drop unsupported fields left at their off value; refuse those set."""
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if not (k in cls.UNSUPPORTED_FIELDS and v in UNSET_VALUES)}
        if data.get("modalities") == ["text"]:  # what we answer with anyway
            del data["modalities"]
        if refused := sorted(k for k in data if k in cls.UNSUPPORTED_FIELDS):
            raise PydanticCustomError(
                "not_supported", "{fields}: not supported by this server", {"fields": ", ".join(refused)}
            )
        return data

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > C.MAX_STOP_SEQUENCES or any(not s for s in stops):
            raise ValueError(f"stop takes at most {C.MAX_STOP_SEQUENCES} non-empty strings")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def deadlines(self) -> Deadlines:
        """The deadlines this request asks for (unset: the model's defaults)."""
        return Deadlines(
            first_chunk_timeout_s=self.first_chunk_timeout_s,
            chunk_timeout_s=self.chunk_timeout_s,
            request_timeout_s=self.request_timeout_s,
        )


# -- responses ---------------------------------------------------------------------------


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class Chunks:
    """The chunks of one stream: shared id, object, model and creation time; with
    ``include_usage``, every chunk carries ``usage`` (null until the last), as OpenAI's do."""

    __slots__ = ("completion_id", "created", "include_usage", "model")
    OBJECT = ""

    def __init__(self, completion_id: str, model: str, include_usage: bool = False) -> None:
        self.completion_id = completion_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage

    def _chunk(self, choices: list[dict[str, Any]], usage: Usage | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.completion_id,
            "object": self.OBJECT,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage_body(usage) if usage else None
        return body

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """The last chunk: no choices, the request's usage."""
        return self._chunk([], usage)


def token_body(token: bytes, logprob: float) -> dict[str, Any]:
    # OpenAI's shape; -inf (a token no sampler could pick) is JSON's -9999.0, as OpenAI sends it.
    return {
        "token": token.decode("utf-8", errors="replace"),
        "logprob": max(logprob, -9999.0),
        "bytes": list(token),
    }


def completion_object(
    obj: str, completion_id: str, model: str, choices: list[dict[str, Any]], usage: Usage
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_body(usage),
    }


def model_card(info: ModelInfo, created: int) -> dict[str, Any]:
    """An OpenAI model object with our extra fields."""
    return {
        "id": info.id,
        "object": "model",
        "created": created,
        "owned_by": "nika-serve",
        **info.model_dump(mode="json", exclude={"id"}),
    }


# -- SSE ---------------------------------------------------------------------------------

SSE_DONE = b"data: [DONE]\n\n"


def sse_event(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def named_sse_event(body: dict[str, Any]) -> bytes:
    """The framing of Anthropic's stream and of OpenAI's Responses stream: each event named by its type."""
    return f"event: {body['type']}\ndata: ".encode() + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


@dataclass(frozen=True, slots=True)
class EventStream:
    """How an API frames a streamed response: each event, the error that ends a stream whose
    headers are already out, and the closing bytes."""

    event: Callable[[dict[str, Any]], bytes]
    error: Callable[[ServeError], dict[str, Any]]
    done: bytes


OPENAI_EVENTS = EventStream(event=sse_event, error=ServeError.to_body, done=SSE_DONE)
