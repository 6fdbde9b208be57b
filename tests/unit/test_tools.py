"""Tool calls without engines: parsing the common formats, streaming them, templates, validation."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deployments.engines.base import Delta, Usage
from deployments.errors import InvalidRequest
from deployments.protocol.chat import ChatCompletionRequest
from deployments.serving.core import parse_request
from deployments.tools import Tool, ToolCallFilter, ToolUse, fallback_messages, parse_tool_calls, template_input

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
NAMES = {"get_weather", "get_time"}


def parse_chat(raw: Any) -> ChatCompletionRequest:
    return parse_request(raw, ChatCompletionRequest)


def use(mode: str = "auto", named: str | None = None, parallel: bool = True) -> ToolUse:
    return ToolUse((Tool.model_validate(WEATHER), Tool.model_validate(TIME)), mode, named, parallel)  # type: ignore[arg-type]


def calls_of(text: str) -> tuple[str | None, list[tuple[str, dict[str, Any]]]]:
    content, calls = parse_tool_calls(text, NAMES)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        # Hermes / Qwen 2.5+: one or more <tool_call> blocks, maybe after some text.
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', None,
         [("get_weather", {"city": "Oslo"})]),
        ('Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
         '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', "Let me check.",
         [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
        # Llama 3.x: the whole answer is JSON with "parameters"; several are ';'-separated.
        ('{"name": "get_weather", "parameters": {"city": "Rome"}}', None, [("get_weather", {"city": "Rome"})]),
        ('<|python_tag|>{"name": "get_time", "parameters": {}}', None, [("get_time", {})]),
        ('{"name": "get_weather", "parameters": {"city": "A"}}; {"name": "get_time", "parameters": {}}', None,
         [("get_weather", {"city": "A"}), ("get_time", {})]),
        # Mistral: [TOOL_CALLS] and a JSON array; arguments may come as JSON text.
        ('[TOOL_CALLS] [{"name": "get_weather", "arguments": "{\\"city\\": \\"Lima\\"}"}]', None,
         [("get_weather", {"city": "Lima"})]),
        # Not calls: plain text, JSON that names no tool, a broken call.
        ("It is sunny.", "It is sunny.", []),
        ('{"name": "launch_rocket", "parameters": {}}', '{"name": "launch_rocket", "parameters": {}}', []),
        ('<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',
         '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>', []),
    ],
)  # fmt: skip
def test_auto_parses_the_common_formats(text: str, content: str | None, calls: list[Any]) -> None:
    assert calls_of(text) == (content, calls)


def stream(filter_: ToolCallFilter, pieces: list[str]) -> tuple[str, list[Any], str]:
    """Push pieces as deltas (the last one final): (content streamed, calls, finish reason)."""
    out, calls, reason = "", [], ""
    for i, piece in enumerate(pieces):
        final = i == len(pieces) - 1
        delta = Delta(piece, "stop" if final else None, Usage(1, 1) if final else None)
        delta, found = filter_.filter(delta)
        out += delta.text
        calls += found
        reason = delta.finish_reason or reason
    return out, [(c.name, json.loads(c.arguments)) for c in calls], reason


def test_auto_streams_text_and_holds_back_from_a_calls_marker() -> None:
    filter_ = ToolCallFilter(use())
    assert filter_.push("Checking <tool") == "Checking "  # a marker may be beginning: held
    pieces = ['_call>{"name": "get_time",', ' "arguments": {}}</tool_call>']
    assert stream(filter_, pieces) == ("", [("get_time", {})], "tool_calls")


def test_auto_releases_held_text_that_was_no_call() -> None:
    assert stream(ToolCallFilter(use()), ["<tool", "box> and ", "{json}"]) == ("<toolbox> and {json}", [], "stop")
    assert stream(ToolCallFilter(use()), ['{"a":', " 1}"]) == ('{"a": 1}', [], "stop")


def test_required_and_named_calls_come_from_constrained_json() -> None:
    required = stream(ToolCallFilter(use("required")), ['[{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}]'])
    assert required == ("", [("get_weather", {"city": "Oslo"})], "tool_calls")
    named = stream(ToolCallFilter(use("named", "get_weather")), ['{"city": "Nice"}'])
    assert named == ("", [("get_weather", {"city": "Nice"})], "tool_calls")
    # max_tokens cut the JSON: no call, the text as it came, the finish reason as it was.
    assert stream(ToolCallFilter(use("named", "get_weather")), ['{"city": "Ni']) == ('{"city": "Ni', [], "stop")


def test_call_schemas() -> None:
    schema = use("required", parallel=False).call_schema()
    assert schema is not None and schema["minItems"] == 1 and schema["maxItems"] == 1
    first, second = schema["items"]["anyOf"]
    assert first["properties"]["name"] == {"const": "get_weather"}
    assert first["properties"]["arguments"] == WEATHER["function"]["parameters"]
    assert second["properties"]["arguments"] == {"type": "object", "properties": {}, "additionalProperties": False}
    assert use("named", "get_weather").call_schema() == WEATHER["function"]["parameters"]
    assert use("auto").call_schema() is None


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
CONVERSATION = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": '{"temp": 3}', "tool_call_id": "call_1"},
)
HERMES_TEMPLATE = (  # the shape of Qwen 2.5's: tools in the system turn, calls and results in tags
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t.function | tojson }}\n{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% endfor %}<|im_start|>assistant\n"
)


def test_a_template_that_renders_tools_gets_them_as_they_are() -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    messages, tools = template_input(CONVERSATION, (WEATHER,), HERMES_TEMPLATE)
    prompt = Jinja2ChatFormatter(HERMES_TEMPLATE, "</s>", "<s>")(messages=messages, tools=tools).prompt
    assert '"name": "get_weather", "description": "The weather in a city."' in prompt
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in prompt
    assert '<|im_start|>tool\n{"temp": 3}' in prompt


def test_the_fallback_for_templates_that_know_no_tools() -> None:
    messages, tools = template_input(CONVERSATION, (WEATHER,), "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert tools is None
    system, user, assistant, result = messages
    assert system["content"].startswith("Be brief.\n\nYou can call these functions:\n")
    assert '"name": "get_weather"' in system["content"] and "<tool_call>" in system["content"]
    assert user == CONVERSATION[1]
    assert assistant == {
        "role": "assistant",
        "content": '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
    }
    assert result == {"role": "user", "content": '<tool_response>\n{"temp": 3}\n</tool_response>'}
    assert fallback_messages([{"role": "user", "content": "hi"}], ()) == [{"role": "user", "content": "hi"}]


BASE = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER]}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope' is not in tools"),
        ({"tools": None, "tool_choice": "required"}, "'required' needs tools"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined"),
        ({"tools": [WEATHER, WEATHER]}, "unique"),
        ({"messages": [{"role": "tool", "content": "3", "tool_call_id": "call_9"}]}, "answers no tool call"),
        ({"messages": [{"role": "assistant", "content": None}]}, "content: required"),
        ({"messages": [{"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]}, "JSON object"),
    ],
)  # fmt: skip
def test_bad_tool_requests_are_400s_that_say_what_to_fix(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_chat(BASE | extra)


def test_a_conversation_with_calls_and_results_parses_into_template_messages() -> None:
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "content": '{"temp": 3}', "tool_call_id": "call_1"},
    ]  # fmt: skip
    request = parse_chat(BASE | {"messages": messages})
    assert [m.engine_message() for m in request.messages][1:] == [dict(CONVERSATION[2]), dict(CONVERSATION[3])]
    tool_use = request.tool_use()
    assert tool_use is not None and tool_use.mode == "auto"
    assert parse_chat(BASE | {"tool_choice": "none"}).tool_use() is None


def test_a_functions_parameters_must_be_a_json_schema() -> None:
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}
    with pytest.raises(InvalidRequest, match=r"tools\.0\.function\.parameters: not a valid JSON schema"):
        parse_chat(BASE | {"tools": [bad]})
