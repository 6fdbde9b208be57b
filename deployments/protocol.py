"""OpenAI-compatible chat request/response models and SSE framing.

Only protocol lives here: no FastAPI, no Serve. Unknown request fields are rejected so a
misspelt option is an error the client sees, not a silently ignored setting.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator
from pydantic_core import PydanticCustomError

from deployments import constants as C
from deployments.engines.base import Delta, JsonOutput, ModelInfo, TokenLogprob, Usage


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    @property
    def images(self) -> list[ImagePart]:
        return [] if isinstance(self.content, str) else [p for p in self.content if isinstance(p, ImagePart)]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def engine_message(self) -> dict[str, Any]:
        """The message an engine's chat template takes: string content unless it has images."""
        if not self.images:
            return {"role": self.role, "content": self.text()}
        parts = [
            {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"} for p in self.content
        ]
        return {"role": self.role, "content": parts}


class StreamOptions(_Strict):
    include_usage: bool = False


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchema(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # our output always matches the schema: constrained decoding

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        from jsonschema import Draft202012Validator, SchemaError

        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            raise PydanticCustomError(
                "invalid_schema", "not a valid JSON schema: {why}", {"why": exc.message}
            ) from None
        return schema


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]

# OpenAI chat fields this server cannot honour: a request that sets one gets a 400 saying so,
# never an answer that silently ignores it.
UNSUPPORTED_FIELDS = (
    "audio",
    "modalities",
    "prediction",
    "web_search_options",
    "functions",
    "function_call",
    "reasoning_effort",
    "verbosity",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
)
UNSET_VALUES = (None, False, [], {})


class ChatCompletionRequest(_Strict):
    """``POST /v1/chat/completions``; the deadline fields are our extension (``extra_body``)."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Literal[1] = 1
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[int, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        default=None, description="Token id -> bias added to its logit."
    )
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=C.MAX_TOP_LOGPROBS)
    # Fields that describe the caller, not the answer: accepted, not acted on (as vLLM does).
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: Literal[False] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # Extensions (``extra_body``): sampling options of vLLM and llama.cpp.
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    ignore_eos: bool = False
    first_chunk_timeout_s: float | None = Field(default=None, gt=0)
    chunk_timeout_s: float | None = Field(default=None, gt=0)
    request_timeout_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        """Drop OpenAI fields left at their off value; refuse those set (see ``UNSUPPORTED_FIELDS``)."""
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if not (k in UNSUPPORTED_FIELDS and v in UNSET_VALUES)}
        if data.get("modalities") == ["text"]:  # what we answer with anyway
            del data["modalities"]
        if refused := sorted(k for k in data if k in UNSUPPORTED_FIELDS):
            raise PydanticCustomError(
                "not_supported", "{fields}: not supported by this server", {"fields": ", ".join(refused)}
            )
        return data

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise PydanticCustomError("logprobs", "top_logprobs: needs logprobs set to true")
        return self

    @property
    def logprobs_top(self) -> int | None:
        """What the engines report: None, or each token's logprob and this many alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > C.MAX_STOP_SEQUENCES or any(not s for s in stops):
            raise ValueError(f"stop takes at most {C.MAX_STOP_SEQUENCES} non-empty strings")
        return stops

    @property
    def has_images(self) -> bool:
        return any(m.images for m in self.messages)


def json_output(response_format: TextFormat | JsonObjectFormat | JsonSchemaFormat | None) -> JsonOutput | None:
    """What the engines must enforce for a ``response_format``."""
    if isinstance(response_format, JsonSchemaFormat):
        return JsonOutput(json_schema=response_format.json_schema.schema_)
    if isinstance(response_format, JsonObjectFormat):
        return JsonOutput()
    return None


# -- responses ---------------------------------------------------------------------------


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class ChunkFactory:
    """Builds the ``chat.completion.chunk`` dicts of one stream (shared id, model, created)."""

    __slots__ = ("_first", "completion_id", "created", "include_usage", "model")

    def __init__(self, completion_id: str, model: str, include_usage: bool) -> None:
        self.completion_id = completion_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self._first = True

    def _chunk(self, choices: list[dict[str, Any]], usage: Usage | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage_body(usage) if usage else None
        return body

    def chunks(self, delta: Delta) -> list[dict[str, Any]]:
        """The OpenAI chunks for one delta: text, then finish reason, then usage if asked."""
        out = []
        if delta.text or self._first or delta.logprobs:
            message: dict[str, Any] = {"content": delta.text}
            if self._first:
                message["role"] = "assistant"
                self._first = False
            choice = {"index": 0, "delta": message, "finish_reason": None}
            if delta.logprobs:
                choice["logprobs"] = logprobs_body(delta.logprobs)
            out.append(self._chunk([choice]))
        if delta.finish_reason:
            out.append(self._chunk([{"index": 0, "delta": {}, "finish_reason": delta.finish_reason}]))
            if self.include_usage and delta.usage:
                out.append(self._chunk([], delta.usage))
        return out


def _token(token: bytes, logprob: float) -> dict[str, Any]:
    # OpenAI's shape; -inf (a token no sampler could pick) is JSON's -9999.0, as OpenAI sends it.
    return {
        "token": token.decode("utf-8", errors="replace"),
        "logprob": max(logprob, -9999.0),
        "bytes": list(token),
    }


def logprobs_body(logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            _token(lp.token, lp.logprob) | {"top_logprobs": [_token(t, p) for t, p in lp.top]} for lp in logprobs
        ]
    }


def completion_body(
    completion_id: str, model: str, text: str, finish_reason: str, usage: Usage, logprobs: Sequence[TokenLogprob] | None
) -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
    if logprobs is not None:
        choice["logprobs"] = logprobs_body(logprobs)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
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
