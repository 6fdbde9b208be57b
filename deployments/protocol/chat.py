"""``POST /v1/chat/completions``: messages, tools and response formats in; completions and chunks out."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator
from pydantic_core import PydanticCustomError

from deployments import constants as C
from deployments.engines.base import Delta, JsonOutput, TokenLogprob, Usage
from deployments.protocol.common import (
    Chunks,
    ContentPart,
    GenerationFields,
    ImagePart,
    Strict,
    TextPart,
    completion_object,
    token_body,
)
from deployments.tools import JsonSchemaDict, NamedToolChoice, Tool, ToolCall, ToolUse


class CalledFunction(Strict):
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


class AssistantToolCall(Strict):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(Strict):
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


class TextFormat(Strict):
    type: Literal["text"]


class JsonObjectFormat(Strict):
    type: Literal["json_object"]


class JsonSchema(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: JsonSchemaDict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # our output always matches the schema: constrained decoding


class JsonSchemaFormat(Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


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


def json_output(response_format: TextFormat | JsonObjectFormat | JsonSchemaFormat | None) -> JsonOutput | None:
    """What the engines must enforce for a ``response_format``."""
    if isinstance(response_format, JsonSchemaFormat):
        return JsonOutput(json_schema=response_format.json_schema.schema_)
    if isinstance(response_format, JsonObjectFormat):
        return JsonOutput()
    return None


class ChunkFactory(Chunks):
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


def logprobs_body(logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            token_body(lp.token, lp.logprob) | {"top_logprobs": [token_body(t, p) for t, p in lp.top]}
            for lp in logprobs
        ]
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


def completion_body(completion_id: str, model: str, choices: list[dict[str, Any]], usage: Usage) -> dict[str, Any]:
    return completion_object("chat.completion", completion_id, model, choices, usage)
