"""Tool calls: the request's tools, what constrains or parses the model's calls, and the fallback
for chat templates that know no tools.

``tool_choice`` decides how calls come out of the model:

- ``required`` / a named function: constrained decoding (a JSON schema for the engines), so
  even a weak model emits a valid call whose ``arguments`` match the function's parameters;
- ``auto``: free text, from which the common formats are parsed (Hermes/Qwen ``<tool_call>``
  JSON, Llama 3 JSON with ``parameters``, Mistral ``[TOOL_CALLS]``); streams hold text back from
  where a call may begin;
- ``none``: the tools are shown to the model, no call is parsed.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from deployments.engines.base import Delta

ToolMode = Literal["auto", "required", "named"]  # tool_choice none: no ToolUse at all

# Markers after which a message's text is a tool call, in the formats ``auto`` parses.
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MARKERS = (HERMES_OPEN, "[TOOL_CALLS]", "<|python_tag|>")
_HERMES = re.compile(re.escape(HERMES_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(HERMES_CLOSE) + r"|$)", re.DOTALL)
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def _valid_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    from jsonschema import Draft202012Validator, SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise PydanticCustomError("invalid_schema", "not a valid JSON schema: {why}", {"why": exc.message}) from None
    return schema


# A JSON schema that constrains decoding (response_format, a function's parameters): checked on arrival.
JsonSchemaDict = Annotated[dict[str, Any], AfterValidator(_valid_json_schema)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: JsonSchemaDict | None = None
    strict: bool | None = None  # calls always match: constrained decoding (required, named)


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def body(self, index: int | None = None) -> dict[str, Any]:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def new_call(name: str, arguments: Any) -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(name, text, f"call_{uuid.uuid4().hex[:24]}")


@dataclass(frozen=True, slots=True)
class ToolUse:
    """The tools of one request and how their calls come out of the model."""

    tools: tuple[Tool, ...]
    mode: ToolMode
    named: str | None = None  # the function of mode "named"
    parallel: bool = True

    def parameters(self, name: str) -> dict[str, Any]:
        spec = next(t.function for t in self.tools if t.function.name == name)
        return spec.parameters or NO_PARAMETERS

    def call_schema(self) -> dict[str, Any] | None:
        """The JSON schema that constrains the output (required, named), else None."""
        if self.mode == "named":
            assert self.named is not None
            return self.parameters(self.named)
        if self.mode != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": t.function.name}, "arguments": self.parameters(t.function.name)},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in self.tools
        ]
        array: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
        return array | {"minItems": 1} | ({} if self.parallel else {"maxItems": 1})

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished answer."""
        if self.mode == "named":
            assert self.named is not None
            return None, [new_call(self.named, json.loads(text))]
        if self.mode == "required":
            return None, [new_call(call["name"], call["arguments"]) for call in json.loads(text)]
        return parse_tool_calls(text, {t.function.name for t in self.tools})

    def template_tools(self) -> tuple[dict[str, Any], ...]:
        """The tools as chat templates take them (OpenAI's shape)."""
        return tuple(t.model_dump(exclude_none=True) for t in self.tools)


def _calls_from(values: list[Any] | None, names: set[str]) -> list[ToolCall] | None:
    """Calls from parsed JSON values, each ``{name, arguments | parameters}`` or a list of them;
    None unless every one is a call to one of ``names``."""
    items = [item for value in values or () for item in (value if isinstance(value, list) else [value])]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):  # some models send arguments as JSON text already
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append(new_call(item["name"], arguments))
    return calls or None


def _json_values(text: str) -> list[Any] | None:
    """Consecutive JSON values (separated by whitespace or ``;``), or None if ``text`` is not that."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while i < len(text):
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
        if i == len(text):
            break
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        values.append(value)
    return values


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """Tool calls in the common formats; text that is not a call to one of ``names`` stays content."""
    if HERMES_OPEN in text:
        head = text[: text.index(HERMES_OPEN)]
        calls: list[ToolCall] = []
        for body in _HERMES.findall(text):
            found = _calls_from(_json_values(body), names)
            if found is None:
                return text, []
            calls += found
        return (head.strip() or None), calls
    for marker in MARKERS[1:]:  # Mistral's array, Llama 3's python tag
        if marker in text:
            head, _, body = text.partition(marker)
            found = _calls_from(_json_values(body), names)
            return (text, []) if found is None else ((head.strip() or None), found)
    if text.lstrip().startswith(("{", "[")):  # Llama 3 JSON: the whole answer is the call(s)
        found = _calls_from(_json_values(text), names)
        if found is not None:
            return None, found
    return text, []


class ToolCallFilter:
    """Turns a stream of deltas into content and tool calls. ``auto``: text flows until a call
    may begin, and is held from there; ``required``/named: all is held (it is the call's JSON).
    The final delta parses what was held; what is no call after all (or JSON that ``max_tokens``
    cut short) is released as content."""

    __slots__ = ("_held", "_holding", "_sent_any", "_use")

    def __init__(self, use: ToolUse) -> None:
        self._use = use
        self._held = ""
        self._holding = use.mode in ("required", "named")
        self._sent_any = False

    def filter(self, delta: Delta) -> tuple[Delta, list[ToolCall]]:
        text = self.push(delta.text)
        if delta.finish_reason is None:
            return Delta(text, logprobs=delta.logprobs), []
        rest, calls = self.finish()
        reason = "tool_calls" if calls else delta.finish_reason
        return Delta(text + rest, reason, delta.usage, delta.logprobs, delta.stop_sequence), calls

    def push(self, text: str) -> str:
        """The part of ``text`` that is surely content."""
        self._held += text
        if self._holding:
            return ""
        if not self._sent_any and self._held.lstrip().startswith(("{", "[")):
            self._holding = True  # may be a Llama 3 JSON call
            return ""
        starts = [self._held.index(m) for m in MARKERS if m in self._held]
        if starts:
            cut, self._holding = min(starts), True
        else:  # keep back a suffix that may be a marker's beginning
            cut = len(self._held) - max(
                (k for m in MARKERS for k in range(1, len(m)) if self._held.endswith(m[:k])), default=0
            )
        out, self._held = self._held[:cut], self._held[cut:]
        self._sent_any = self._sent_any or bool(out.strip())
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content still to send, calls)."""
        if not self._holding:
            return self._held, []
        try:
            content, calls = self._use.parse(self._held)
        except (ValueError, KeyError, TypeError):  # a constrained call cut short by max_tokens
            return self._held, []
        return content or "", calls


TOOLS_PROMPT = (
    "You can call these functions:\n{tools}\n"
    "To call one, answer with " + HERMES_OPEN + '{{"name": <function name>, "arguments": <arguments object>}}'
    + HERMES_CLOSE + " (one per call), and nothing else."
)  # fmt: skip


def fallback_messages(messages: list[dict[str, Any]], tools: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    """Messages for a chat template that knows no tools (it never reads ``tools``, ``tool_calls``
    or the ``tool`` role): the tools as a system message, in Hermes' format, calls as
    ``<tool_call>`` text, results as user messages in ``<tool_response>``."""
    out = []
    if tools:
        listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        system = TOOLS_PROMPT.format(tools=listing)
        if messages and messages[0]["role"] in ("system", "developer") and isinstance(messages[0]["content"], str):
            first, messages = messages[0], messages[1:]
            system = f"{first['content']}\n\n{system}"
        out.append({"role": "system", "content": system})
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            calls = "".join(
                HERMES_OPEN + json.dumps(c["function"], ensure_ascii=False) + HERMES_CLOSE
                for c in message["tool_calls"]
            )
            out.append({"role": "assistant", "content": (message.get("content") or "") + calls})
        elif message["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        else:
            out.append(message)
    return out


def knows_tools(template: str) -> bool:
    """Whether a chat template renders tools (reads the ``tools`` variable)."""
    return re.search(r"\btools\b", template) is not None


def template_input(
    messages: tuple[dict[str, Any], ...], tools: tuple[dict[str, Any], ...], template: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) for a chat template: as they are when it renders tools, else the fallback."""
    if knows_tools(template):
        return list(messages), list(tools) or None
    if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return fallback_messages(list(messages), tools), None
    return list(messages), None
