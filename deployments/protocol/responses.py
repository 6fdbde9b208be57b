"""OpenAI's Responses API (``POST /v1/responses``): its request, translated to a chat completion
request, and its response object and stream events.

Stateless: a response is not stored, so ``store: true`` and ``previous_response_id`` are refused
with a 400 that says so; a conversation goes back in ``input``, as its items (messages, function
calls and their outputs, what an earlier response's ``output`` held).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, PositiveInt, Tag, model_validator
from pydantic_core import PydanticCustomError

from deployments.engines.base import Delta, Usage
from deployments.errors import ServeError
from deployments.protocol.common import EventStream, Strict, named_sse_event
from deployments.tools import JsonSchemaDict, ToolCall


class Echoed(BaseModel):
    """An input item, as clients send back what a response's ``output`` held: fields this server
    does not read (an item's ``id`` and ``status``, a text's ``annotations``) are ignored."""

    model_config = ConfigDict(extra="ignore")


class InputText(Echoed):
    type: Literal["input_text", "output_text"]  # output_text: an assistant turn sent back
    text: str


class InputImage(Echoed):
    type: Literal["input_image"]
    image_url: str = Field(min_length=1, description="A URL or a data URL (file ids are not served here).")
    detail: Literal["auto", "low", "high", "original"] | None = None


class Refusal(Echoed):
    type: Literal["refusal"]
    refusal: str


Part = Annotated[InputText | InputImage | Refusal, Field(discriminator="type")]


class MessageItem(Echoed):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]


class FunctionCallItem(Echoed):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str
    arguments: str


class FunctionCallOutputItem(Echoed):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[InputText]


class ReasoningItem(Echoed):
    """An earlier turn's reasoning: not part of the prompt here."""

    type: Literal["reasoning"]


def _item_type(value: Any) -> str:
    return (value.get("type") if isinstance(value, dict) else getattr(value, "type", None)) or "message"


Item = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]


class FunctionTool(Strict):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: JsonSchemaDict | None = None
    strict: bool | None = None  # calls always match the schema: constrained decoding


class NamedFunction(Strict):
    type: Literal["function"]
    name: str


class TextFormatPlain(Strict):
    type: Literal["text"]


class TextFormatJsonObject(Strict):
    type: Literal["json_object"]


class TextFormatJsonSchema(Strict):
    type: Literal["json_schema"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: JsonSchemaDict = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(Strict):
    format: Annotated[TextFormatPlain | TextFormatJsonObject | TextFormatJsonSchema, Field(discriminator="type")] = (
        TextFormatPlain(type="text")
    )
    verbosity: Literal["low", "medium", "high"] | None = None  # a hint for reasoning models: moot here


class ResponsesRequest(Strict):
    """``POST /v1/responses``."""

    model: str
    input: str | list[Item]
    instructions: str | None = None
    max_output_tokens: PositiveInt | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    # Fields that describe the caller, not the answer: accepted, not acted on.
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    truncation: Literal["disabled"] | None = None
    stream_options: dict[str, Any] | None = None
    # Our extensions, as on every generation API: top-k, exact lengths, deadlines.
    top_k: int | None = Field(default=None, ge=0)
    ignore_eos: bool = False
    first_chunk_timeout_s: float | None = Field(default=None, gt=0)
    chunk_timeout_s: float | None = Field(default=None, gt=0)
    request_timeout_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _stateless(self) -> ResponsesRequest:
        if self.store:
            raise PydanticCustomError(
                "store", "store: this server keeps no responses; leave store out or set it to false"
            )
        if self.previous_response_id is not None:
            raise PydanticCustomError(
                "previous_response_id",
                "previous_response_id: this server keeps no responses; send the conversation in input instead "
                "(an earlier response's output items go back as they are)",
            )
        return self

    def chat_request(self) -> dict[str, Any]:
        """The chat completion request that computes this one (validated as such by the caller)."""
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.instructions}] if self.instructions else []
        for item in [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input:
            if isinstance(item, MessageItem):
                messages.append({"role": item.role, "content": _content(item.content)})
            elif isinstance(item, FunctionCallItem):
                call = {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments},
                }
                if not (messages and messages[-1]["role"] == "assistant"):
                    messages.append({"role": "assistant", "content": None})
                messages[-1].setdefault("tool_calls", []).append(call)
            elif isinstance(item, FunctionCallOutputItem):
                output = item.output if isinstance(item.output, str) else "".join(p.text for p in item.output)
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": self.stream}
        fields = ("temperature", "top_p", "top_k", "parallel_tool_calls", "user", "ignore_eos")
        fields += ("first_chunk_timeout_s", "chunk_timeout_s", "request_timeout_s")
        body |= {name: value for name in fields if (value := getattr(self, name)) not in (None, False)}
        if self.max_output_tokens is not None:
            body["max_tokens"] = self.max_output_tokens
        if self.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": t.model_dump(include={"name", "description", "parameters"}, exclude_none=True),
                }
                for t in self.tools
            ]
        if self.tool_choice is not None:
            choice = self.tool_choice
            body["tool_choice"] = (
                {"type": "function", "function": {"name": choice.name}} if isinstance(choice, NamedFunction) else choice
            )
        fmt = self.text.format if self.text else None
        if isinstance(fmt, TextFormatJsonSchema):
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.schema_}}
        elif isinstance(fmt, TextFormatJsonObject):
            body["response_format"] = {"type": "json_object"}
        return body

    def echo(self) -> dict[str, Any]:
        """The request's settings, as a response object repeats them."""
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "tools": [t.model_dump(exclude_none=True) for t in self.tools or ()],
            "tool_choice": self.tool_choice.model_dump()
            if isinstance(self.tool_choice, NamedFunction)
            else self.tool_choice or "auto",
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "text": (self.text or TextConfig()).model_dump(by_alias=True, exclude_none=True),
            "metadata": self.metadata or {},
            "user": self.user,
            "store": False,
            "truncation": "disabled",
            "previous_response_id": None,
            "reasoning": None,
            "background": False,
        }


def _content(content: str | list[Any]) -> str | list[dict[str, Any]] | None:
    """A message's content as chat takes it: text, or text and image parts in order."""
    if isinstance(content, str):
        return content
    parts = [
        {"type": "image_url", "image_url": {"url": p.image_url}}
        if isinstance(p, InputImage)
        else {"type": "text", "text": p.text if isinstance(p, InputText) else p.refusal}
        for p in content
    ]
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


# -- responses ---------------------------------------------------------------------------


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [_text_part(text)] if status != "in_progress" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _call_item(call: ToolCall, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": call.id.replace("call_", "fc_", 1),
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments if status == "completed" else "",
        "status": status,
    }


class ResponseBuilder:
    """One response object and, streaming, its events, numbered in order: a message item while
    text flows, a function_call item per call (arguments whole, in one delta), then the response
    completed (``incomplete`` when ``max_output_tokens`` cut it)."""

    __slots__ = ("_created", "_echo", "_id", "_model", "_output", "_sequence", "_text", "_text_index")

    def __init__(self, response_id: str, model: str, request: ResponsesRequest) -> None:
        self._id = response_id
        self._model = model
        self._echo = request.echo()
        self._created = int(time.time())
        self._output: list[dict[str, Any]] = []
        self._sequence = 0
        self._text: str | None = None  # the open message item's text
        self._text_index = 0

    def response(
        self, status: str = "in_progress", usage: Usage | None = None, error: ServeError | None = None
    ) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "response",
            "created_at": self._created,
            "status": status,
            "model": self._model,
            "output": list(self._output),
            "usage": usage_body(usage) if usage else None,
            "error": {"code": error.code, "message": error.message} if error else None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            **self._echo,
        }

    def whole(self, final: Delta, calls: Sequence[ToolCall]) -> dict[str, Any]:
        """The response of a finished generation: ``final`` holds its whole text."""
        if final.text or not calls:
            self._output.append(_message_item(self._message_id(), final.text, "completed"))
        self._output += [_call_item(c, "completed") for c in calls]
        assert final.usage is not None
        return self.response(self._status(final), final.usage)

    # -- streaming --------------------------------------------------------------------

    def start(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response=self.response()),
            self._event("response.in_progress", response=self.response()),
        ]

    def events(self, delta: Delta, calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if delta.text:
            if self._text is None:
                out += self._open_text()
            self._text += delta.text
            out.append(self._event("response.output_text.delta", **self._where(), delta=delta.text, logprobs=[]))
        if calls or delta.finish_reason:
            out += self._close_text()
        for call in calls:
            index = len(self._output)
            item_id = call.id.replace("call_", "fc_", 1)
            self._output.append(_call_item(call, "completed"))
            out += [
                self._event("response.output_item.added", output_index=index, item=_call_item(call, "in_progress")),
                self._event(
                    "response.function_call_arguments.delta", item_id=item_id, output_index=index, delta=call.arguments
                ),
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item_id,
                    output_index=index,
                    name=call.name,
                    arguments=call.arguments,
                ),
                self._event("response.output_item.done", output_index=index, item=self._output[index]),
            ]
        if delta.finish_reason:
            status = self._status(delta)
            kind = "response.completed" if status == "completed" else "response.incomplete"
            out.append(self._event(kind, response=self.response(status, delta.usage)))
        return out

    def failed(self, error: ServeError) -> list[dict[str, Any]]:
        """How a stream whose headers are out ends on an error: an ``error``, then ``response.failed``."""
        return [
            self._event("error", code=error.code, message=error.message, param=None),
            self._event("response.failed", response=self.response("failed", error=error)),
        ]

    def _open_text(self) -> list[dict[str, Any]]:
        self._text, self._text_index = "", len(self._output)
        item = _message_item(self._message_id(), "", "in_progress")
        self._output.append(item)
        return [
            self._event("response.output_item.added", output_index=self._text_index, item=item),
            self._event("response.content_part.added", **self._where(), part=_text_part("")),
        ]

    def _close_text(self) -> list[dict[str, Any]]:
        if self._text is None:
            return []
        text, self._text = self._text, None
        item = self._output[self._text_index] = _message_item(self._output[self._text_index]["id"], text, "completed")
        where = {"item_id": item["id"], "output_index": self._text_index, "content_index": 0}
        return [
            self._event("response.output_text.done", **where, text=text, logprobs=[]),
            self._event("response.content_part.done", **where, part=_text_part(text)),
            self._event("response.output_item.done", output_index=self._text_index, item=item),
        ]

    def _message_id(self) -> str:
        return f"msg_{len(self._output)}_{self._id}"

    def _where(self) -> dict[str, Any]:
        return {"item_id": self._output[self._text_index]["id"], "output_index": self._text_index, "content_index": 0}

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self._sequence += 1
        return {"type": kind, "sequence_number": self._sequence - 1, **fields}

    @staticmethod
    def _status(final: Delta) -> str:
        return "incomplete" if final.finish_reason == "length" else "completed"


def _error_event(error: ServeError) -> dict[str, Any]:
    return {"type": "error", "code": error.code, "message": error.message, "param": None, "sequence_number": 0}


# Named events, as OpenAI streams responses; no closing line. (Errors after the first event are
# written by ResponseBuilder.failed, numbered; this one only frames an error the stream could not.)
EVENTS = EventStream(event=named_sse_event, error=_error_event, done=b"")
