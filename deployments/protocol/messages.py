"""Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``): its request,
translated to a chat completion request, and its response, events and errors.

The translation is the whole adapter: a Messages request becomes the chat request the serving
core already runs (system prompt, content blocks, tool use and results, tools and tool choice,
sampling, stop sequences), and the chat layer's deltas and tool calls become Anthropic's content
blocks and stream events.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from pydantic_core import PydanticCustomError

from deployments import constants as C
from deployments.engines.base import Delta, Usage
from deployments.errors import ServeError
from deployments.protocol.common import EventStream, Strict, named_sse_event
from deployments.tools import JsonSchemaDict, ToolCall


class Echoed(BaseModel):
    """A content block, as clients send back what a response held: the SDK's response models
    grow fields (a tool use's ``caller``, say) that a request may echo, so unknown ones are
    ignored here, unlike in the request's own options."""

    model_config = ConfigDict(extra="ignore")


class CacheControl(Strict):
    """A prompt-caching hint: accepted, and needless (prefixes are cached without it)."""

    type: Literal["ephemeral"]
    ttl: str | None = None


class TextBlock(Echoed):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: list[dict[str, Any]] | None = None


class Base64Source(Strict):
    type: Literal["base64"]
    media_type: str
    data: str


class URLSource(Strict):
    type: Literal["url"]
    url: str


class ImageBlock(Echoed):
    type: Literal["image"]
    source: Annotated[Base64Source | URLSource, Field(discriminator="type")]
    cache_control: CacheControl | None = None

    def url(self) -> str:
        """The image as chat takes it: its URL, or its bytes as a data URL."""
        if isinstance(self.source, URLSource):
            return self.source.url
        return f"data:{self.source.media_type};base64,{self.source.data}"


class ToolUseBlock(Echoed):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str
    input: dict[str, Any]
    cache_control: CacheControl | None = None


class ToolResultBlock(Echoed):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None
    cache_control: CacheControl | None = None

    def text(self) -> str:
        text = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content or ())
        return f"Error: {text}" if self.is_error else text


class ThinkingBlock(Echoed):
    """An earlier turn's reasoning, as agent loops send it back: not part of the prompt here."""

    type: Literal["thinking", "redacted_thinking"]
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None


Block = Annotated[TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")]


class InputMessage(Strict):
    role: Literal["user", "assistant"]
    content: str | list[Block]

    @model_validator(mode="after")
    def _blocks_fit_the_role(self) -> InputMessage:
        kinds = {b.type for b in self.content} if isinstance(self.content, list) else set()
        wrong = kinds & ({"tool_use", "thinking", "redacted_thinking"} if self.role == "user" else {"tool_result"})
        if wrong:
            raise PydanticCustomError(
                "content",
                "content: {role} messages carry no {kinds} blocks",
                {"role": self.role, "kinds": sorted(wrong)},
            )
        return self

    def chat_messages(self) -> list[dict[str, Any]]:
        """The chat messages this one becomes: a user turn's tool results first (each a tool
        message answering its call), then its text and images; an assistant turn's text and calls."""
        if isinstance(self.content, str):
            return [{"role": self.role, "content": self.content}]
        if self.role == "assistant":
            text = "".join(b.text for b in self.content if isinstance(b, TextBlock))
            calls = [
                {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
                for b in self.content
                if isinstance(b, ToolUseBlock)
            ]
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                message |= {"content": text or None, "tool_calls": calls}
            return [message]
        messages: list[dict[str, Any]] = [
            {"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()}
            for b in self.content
            if isinstance(b, ToolResultBlock)
        ]
        parts = [
            {"type": "text", "text": b.text}
            if isinstance(b, TextBlock)
            else {"type": "image_url", "image_url": {"url": b.url()}}
            for b in self.content
            if isinstance(b, TextBlock | ImageBlock)
        ]
        if parts:
            text_only = all(p["type"] == "text" for p in parts)
            messages.append({"role": "user", "content": "".join(p["text"] for p in parts) if text_only else parts})
        return messages


class ToolSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")
    description: str | None = None
    input_schema: JsonSchemaDict
    type: Literal["custom"] | None = None
    cache_control: CacheControl | None = None


class ToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _named(self) -> ToolChoice:
        if (self.type == "tool") != (self.name is not None):
            raise PydanticCustomError("tool_choice", "tool_choice.name: required with type 'tool', and only then")
        return self


class Metadata(Strict):
    user_id: str | None = None


class ThinkingDisabled(Strict):
    type: Literal["disabled"]


class JsonOutputFormat(Strict):
    type: Literal["json_schema"]
    schema_: JsonSchemaDict = Field(alias="schema")


class OutputConfig(Strict):
    """Structured output (``format``: the answer is JSON matching the schema, by constrained
    decoding); ``effort`` is a reasoning hint, accepted and moot here."""

    format: JsonOutputFormat | None = None
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None


class MessagesRequest(Strict):
    """``POST /v1/messages``; ``max_tokens`` is required, as Anthropic requires it."""

    model: str
    max_tokens: PositiveInt
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    output_config: OutputConfig | None = None
    cache_control: CacheControl | None = None
    stop_sequences: list[str] | None = Field(default=None, max_length=C.MAX_STOP_SEQUENCES)
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoice | None = None
    stream: bool = False
    metadata: Metadata | None = None
    service_tier: str | None = None
    thinking: ThinkingDisabled | None = Field(default=None, description="Extended thinking is not supported here.")
    # Our extensions, as on every generation API: exact lengths, deadlines.
    ignore_eos: bool = False
    first_chunk_timeout_s: float | None = Field(default=None, gt=0)
    chunk_timeout_s: float | None = Field(default=None, gt=0)
    request_timeout_s: float | None = Field(default=None, gt=0)

    def chat_request(self) -> dict[str, Any]:
        """The chat completion request that computes this one (validated as such by the caller)."""
        system = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system or ())
        messages = ([{"role": "system", "content": system}] if system else []) + [
            m for message in self.messages for m in message.chat_messages()
        ]
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "stream": self.stream,
            "user": self.metadata.user_id if self.metadata else None,
        }
        fields = (
            "temperature",
            "top_p",
            "top_k",
            "ignore_eos",
            "first_chunk_timeout_s",
            "chunk_timeout_s",
            "request_timeout_s",
        )
        body |= {name: value for name in fields if (value := getattr(self, name)) is not None}
        if self.stop_sequences:
            body["stop"] = self.stop_sequences
        if self.output_config is not None and self.output_config.format is not None:
            schema = {"name": "output", "schema": self.output_config.format.schema_}
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        if self.tools and (self.tool_choice is None or self.tool_choice.type != "none"):
            body["tools"] = [
                {
                    "type": "function",
                    "function": {"name": t.name, "description": t.description, "parameters": t.input_schema},
                }
                for t in self.tools
            ]
            choice = self.tool_choice
            if choice is not None:
                body["tool_choice"] = (
                    {"type": "function", "function": {"name": choice.name}}
                    if choice.type == "tool"
                    else {"auto": "auto", "any": "required"}[choice.type]
                )
                if choice.disable_parallel_tool_use:
                    body["parallel_tool_calls"] = False
        return body


class CountTokensRequest(Strict):
    """``POST /v1/messages/count_tokens``: the prompt a Messages request would start from."""

    model: str
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingDisabled | None = None

    def chat_request(self) -> dict[str, Any]:
        fields = self.model_dump(exclude_none=True, by_alias=True)
        return MessagesRequest.model_validate(fields | {"max_tokens": 1}).chat_request()


# -- responses ---------------------------------------------------------------------------


def stop_reason(final: Delta, calls: Sequence[ToolCall]) -> str:
    if calls:
        return "tool_use"
    if final.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if final.stop_sequence is not None else "end_turn"


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def tool_use_block(call: ToolCall) -> dict[str, Any]:
    """A call as Anthropic's ``tool_use`` block: its arguments an object, its id Anthropic-style."""
    return {
        "type": "tool_use",
        "id": call.id.replace("call_", "toolu_", 1),
        "name": call.name,
        "input": json.loads(call.arguments),
    }


def message_body(message_id: str, model: str, final: Delta, calls: Sequence[ToolCall]) -> dict[str, Any]:
    """One ``message``: ``final`` holds the whole text, the finish reason and the usage."""
    content = ([{"type": "text", "text": final.text}] if final.text or not calls else []) + [
        tool_use_block(c) for c in calls
    ]
    assert final.usage is not None
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(final, calls),
        "stop_sequence": final.stop_sequence,
        "usage": usage_body(final.usage),
    }


class MessageEvents:
    """The events of one streamed message, from the chat layer's deltas and calls: a text block
    while text flows, a tool_use block per call (its input whole, as one JSON delta), then the
    stop reason and usage, and ``message_stop``."""

    __slots__ = ("_block", "_message_id", "_model", "_text_open")

    def __init__(self, message_id: str, model: str) -> None:
        self._message_id = message_id
        self._model = model
        self._block = 0  # the index of the next content block
        self._text_open = False

    def start(self) -> dict[str, Any]:
        message = {
            "id": self._message_id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},  # counted by the end (message_delta)
        }
        return {"type": "message_start", "message": message}

    def events(self, delta: Delta, calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if delta.text:
            if not self._text_open:
                out.append(
                    {"type": "content_block_start", "index": self._block, "content_block": {"type": "text", "text": ""}}
                )
                self._text_open = True
            out.append(
                {
                    "type": "content_block_delta",
                    "index": self._block,
                    "delta": {"type": "text_delta", "text": delta.text},
                }
            )
        if calls or delta.finish_reason:
            out += self._close_text()
        for call in calls:
            block = tool_use_block(call) | {"input": {}}
            arguments = call.arguments
            out += [
                {"type": "content_block_start", "index": self._block, "content_block": block},
                {
                    "type": "content_block_delta",
                    "index": self._block,
                    "delta": {"type": "input_json_delta", "partial_json": arguments},
                },
                {"type": "content_block_stop", "index": self._block},
            ]
            self._block += 1
        if delta.finish_reason:
            assert delta.usage is not None
            stop = {"stop_reason": stop_reason(delta, calls), "stop_sequence": delta.stop_sequence}
            out += [
                {"type": "message_delta", "delta": stop, "usage": usage_body(delta.usage)},
                {"type": "message_stop"},
            ]
        return out

    def _close_text(self) -> list[dict[str, Any]]:
        if not self._text_open:
            return []
        self._text_open = False
        self._block += 1
        return [{"type": "content_block_stop", "index": self._block - 1}]


def count_tokens_body(tokens: int) -> dict[str, Any]:
    return {"input_tokens": tokens}


# -- errors and framing ------------------------------------------------------------------

ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def error_body(error: ServeError) -> dict[str, Any]:
    """Anthropic's error shape, its type from the status (the SDK picks its exception by status)."""
    kind = ERROR_TYPES.get(error.status_code) or ("api_error" if error.status_code >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


EVENTS = EventStream(event=named_sse_event, error=error_body, done=b"")
