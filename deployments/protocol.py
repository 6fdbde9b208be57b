"""OpenAI-compatible chat request/response models and SSE framing.

Only protocol lives here: no FastAPI, no Serve. Unknown request fields are rejected so a
misspelt option is an error the client sees, not a silently ignored setting.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator
from pydantic_core import PydanticCustomError

from deployments import constants as C
from deployments.engines.base import Delta, Embeddings, JsonOutput, ModelInfo, TokenLogprob, Usage
from deployments.tools import JsonSchemaDict, NamedToolChoice, Tool, ToolCall, ToolUse


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


class CalledFunction(_Strict):
    name: str
    arguments: str  # JSON text

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments: str) -> str:
        try:
            valid = isinstance(json.loads(arguments), dict)
        except json.JSONDecodeError:
            valid = False
        if not valid:
            raise PydanticCustomError("arguments", "a tool call's arguments must be a JSON object in a string")
        return arguments


class AssistantToolCall(_Strict):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None  # role assistant
    tool_call_id: str | None = None  # role tool: the call this message answers
    refusal: str | None = None  # what the SDK echoes back of an assistant message

    @model_validator(mode="after")
    def _shape(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise PydanticCustomError("content", "content: required, unless an assistant message has tool_calls")
        if self.tool_calls and self.role != "assistant":
            raise PydanticCustomError("tool_calls", "tool_calls: only assistant messages make tool calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise PydanticCustomError("tool_call_id", "tool_call_id: a tool message, and only one, names its call")
        return self

    @property
    def images(self) -> list[ImagePart]:
        if self.content is None or isinstance(self.content, str):
            return []
        return [p for p in self.content if isinstance(p, ImagePart)]

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def engine_message(self) -> dict[str, Any]:
        """The message an engine's chat template takes: string content unless it has images;
        tool calls with their arguments as objects (what templates render with ``tojson``)."""
        if not self.images:
            message: dict[str, Any] = {"role": self.role, "content": self.text()}
        else:
            parts = [
                {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"} for p in self.content
            ]  # type: ignore[union-attr]
            message = {"role": self.role, "content": parts}
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)},
                }
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class StreamOptions(_Strict):
    include_usage: bool = False


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchema(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: JsonSchemaDict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # our output always matches the schema: constrained decoding


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]

UNSET_VALUES = (None, False, [], {})


class GenerationFields(_Strict):
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


class ChatCompletionRequest(GenerationFields):
    """``POST /v1/chat/completions``."""

    UNSUPPORTED_FIELDS = (
        "audio",
        "modalities",
        "prediction",
        "web_search_options",
        "functions",
        "function_call",
        "reasoning_effort",
        "verbosity",
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=C.MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise PydanticCustomError("logprobs", "top_logprobs: needs logprobs set to true")
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) < len(names):
            raise PydanticCustomError("tools", "tools: function names must be unique")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise PydanticCustomError(
                "tool_choice", "tool_choice: function '{name}' is not in tools", {"name": choice.function.name}
            )
        if choice == "required" and not names:
            raise PydanticCustomError("tool_choice", "tool_choice: 'required' needs tools")
        constrained = choice == "required" or isinstance(choice, NamedToolChoice)
        if constrained and self.response_format is not None and self.response_format.type != "text":
            raise PydanticCustomError(
                "tool_choice", "tool_choice: a required or named call cannot be combined with a JSON response_format"
            )
        calls: set[str] = set()
        for i, message in enumerate(self.messages):
            calls.update(c.id for c in message.tool_calls or ())
            if message.tool_call_id is not None and message.tool_call_id not in calls:
                raise PydanticCustomError(
                    "tool_call_id",
                    "messages.{i}.tool_call_id: '{id}' answers no tool call of an earlier assistant message",
                    {"i": i, "id": message.tool_call_id},
                )
        return self

    def tool_use(self) -> ToolUse | None:
        """How this request's tools are used; None without tools, or when ``tool_choice`` is none."""
        if not self.tools or self.tool_choice == "none":
            return None
        parallel = self.parallel_tool_calls is not False
        if isinstance(self.tool_choice, NamedToolChoice):
            return ToolUse(tuple(self.tools), "named", self.tool_choice.function.name, parallel)
        return ToolUse(tuple(self.tools), self.tool_choice or "auto", None, parallel)

    @property
    def logprobs_top(self) -> int | None:
        """What the engines report: None, or each token's logprob and this many alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def has_images(self) -> bool:
        return any(m.images for m in self.messages)


class CompletionRequest(GenerationFields):
    """``POST /v1/completions``: text in, text out, no chat template. A list of prompts gets
    a choice per prompt (times ``n``), as OpenAI's ``index`` orders them."""

    UNSUPPORTED_FIELDS = ("suffix",)

    prompt: str | list[str] = Field(min_length=1)
    max_tokens: PositiveInt | None = Field(default=16, description="OpenAI's default for text completions.")
    echo: bool = Field(default=False, description="Put the prompt before the generated text.")
    best_of: Literal[1] | None = None
    logprobs: int | None = Field(default=None, ge=0, le=C.MAX_COMPLETION_LOGPROBS)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            raise PydanticCustomError("echo", "echo with logprobs: not supported by this server (no prompt logprobs)")
        return self


class EmbeddingRequest(_Strict):
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


class _Chunks:
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


class ChunkFactory(_Chunks):
    """``chat.completion.chunk`` dicts; each choice opens with the assistant role."""

    __slots__ = ("_opened",)
    OBJECT = "chat.completion.chunk"

    def __init__(self, completion_id: str, model: str, include_usage: bool = False) -> None:
        super().__init__(completion_id, model, include_usage)
        self._opened: set[int] = set()

    def chunks(self, delta: Delta, calls: Sequence[ToolCall] = (), index: int = 0) -> list[dict[str, Any]]:
        """The chunks for one delta of choice ``index``: text, tool calls, then the finish reason."""
        out = []
        if delta.text or delta.logprobs or index not in self._opened:
            message: dict[str, Any] = {"content": delta.text}
            if index not in self._opened:
                message["role"] = "assistant"
                self._opened.add(index)
            choice = {"index": index, "delta": message, "finish_reason": None}
            if delta.logprobs:
                choice["logprobs"] = logprobs_body(delta.logprobs)
            out.append(self._chunk([choice]))
        if calls:  # whole calls, one chunk (the SDK's accumulators take fragments or wholes)
            tool_calls = [call.body(i) for i, call in enumerate(calls)]
            out.append(self._chunk([{"index": index, "delta": {"tool_calls": tool_calls}, "finish_reason": None}]))
        if delta.finish_reason:
            out.append(self._chunk([{"index": index, "delta": {}, "finish_reason": delta.finish_reason}]))
        return out


class TextChunkFactory(_Chunks):
    """``text_completion`` chunks (``/v1/completions`` streams)."""

    __slots__ = ()
    OBJECT = "text_completion"

    def chunk(
        self, index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None
    ) -> dict[str, Any]:
        return self._chunk([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}])


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


def legacy_logprobs(logprobs: Sequence[TokenLogprob], text_offset: int) -> dict[str, Any]:
    """Text completions' logprobs: parallel lists, offsets into the choice's text from ``text_offset``."""
    tokens = [lp.token.decode("utf-8", errors="replace") for lp in logprobs]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [max(lp.logprob, -9999.0) for lp in logprobs],
        "top_logprobs": [{t.decode("utf-8", errors="replace"): max(p, -9999.0) for t, p in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def chat_choice(
    index: int, final: Delta, logprobs: Sequence[TokenLogprob] | None, calls: Sequence[ToolCall] = ()
) -> dict[str, Any]:
    """One choice of a ``chat.completion``: ``final`` holds its whole text and finish reason."""
    message: dict[str, Any] = {"role": "assistant", "content": final.text if final.text or not calls else None}
    if calls:
        message["tool_calls"] = [call.body() for call in calls]
    choice = {"index": index, "message": message, "finish_reason": final.finish_reason}
    if logprobs is not None:
        choice["logprobs"] = logprobs_body(logprobs)
    return choice


def _body(obj: str, completion_id: str, model: str, choices: list[dict[str, Any]], usage: Usage) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_body(usage),
    }


def completion_body(completion_id: str, model: str, choices: list[dict[str, Any]], usage: Usage) -> dict[str, Any]:
    return _body("chat.completion", completion_id, model, choices, usage)


def text_completion_body(completion_id: str, model: str, choices: list[dict[str, Any]], usage: Usage) -> dict[str, Any]:
    return _body("text_completion", completion_id, model, choices, usage)


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
