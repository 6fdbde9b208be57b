"""Anthropic's Messages API as chat: the request's translation, the events and bodies out, errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deployments.engines.base import Delta, Usage
from deployments.errors import InvalidRequest, ModelNotFound, Overloaded, Unauthorized
from deployments.protocol.chat import ChatCompletionRequest
from deployments.protocol.common import named_sse_event
from deployments.protocol.messages import (
    CountTokensRequest,
    MessageEvents,
    MessagesRequest,
    error_body,
    message_body,
)
from deployments.serving.core import parse_request
from deployments.tools import ToolCall

WEATHER = {"name": "weather", "description": "Today's weather", "input_schema": {"type": "object"}}


def messages(**fields: Any) -> MessagesRequest:
    body = {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]} | fields
    return parse_request(body, MessagesRequest)


def test_a_tool_loop_becomes_the_chat_it_means() -> None:
    request = messages(
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "…", "signature": "s"},
                    {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "-3 C"}]},
                    {"type": "text", "text": "Warm enough?"},
                ],
            },
        ],
        tools=[WEATHER],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        stop_sequences=["END"],
        temperature=0.5,
        top_k=20,
        metadata={"user_id": "u1"},
    )
    chat = request.chat_request()
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "-3 C"},
        {"role": "user", "content": "Warm enough?"},
    ]
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {"name": "weather", "description": "Today's weather", "parameters": {"type": "object"}},
        }
    ]
    assert (chat["tool_choice"], chat["parallel_tool_calls"], chat["stop"]) == ("required", False, ["END"])
    assert (chat["temperature"], chat["top_k"], chat["user"], chat["max_tokens"]) == (0.5, 20, "u1", 64)
    parse_request(chat, ChatCompletionRequest)  # and the chat layer takes it


def test_images_become_data_urls_and_a_named_tool_a_named_function() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}}
    request = messages(
        messages=[{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}],
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "weather"},
    )
    chat = request.chat_request()
    assert chat["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
        {"type": "text", "text": "What is it?"},
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert "tools" not in messages(tools=[WEATHER], tool_choice={"type": "none"}).chat_request()


def test_count_tokens_renders_the_prompt_a_message_would() -> None:
    count = parse_request(
        {"model": "m", "system": "S", "messages": [{"role": "user", "content": "hi"}]}, CountTokensRequest
    )
    assert count.chat_request()["messages"] == messages(system="S").chat_request()["messages"]


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking"),
        ({"temperature": 1.5}, "temperature"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice.name: required"),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
            "user messages carry no",
        ),
        ({"container": "c"}, "container: unknown field"),
    ],
)
def test_what_the_api_refuses_is_a_400_that_names_the_field(fields: dict[str, Any], fragment: str) -> None:
    body = {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]} | fields
    with pytest.raises(InvalidRequest, match=fragment):
        parse_request({k: v for k, v in body.items() if v is not None}, MessagesRequest)


def test_a_message_body_says_why_it_stopped() -> None:
    usage = Usage(7, 3, cached_tokens=5)
    done = message_body("msg-1", "m", Delta("Hi", "stop", usage), [])
    assert done["content"] == [{"type": "text", "text": "Hi"}]
    assert (done["stop_reason"], done["stop_sequence"]) == ("end_turn", None)
    assert done["usage"] == {
        "input_tokens": 7,
        "output_tokens": 3,
        "cache_read_input_tokens": 5,
        "cache_creation_input_tokens": 0,
    }
    assert message_body("m", "m", Delta("", "stop", usage, stop_sequence="END"), [])["stop_reason"] == "stop_sequence"
    assert message_body("m", "m", Delta("x", "length", usage), [])["stop_reason"] == "max_tokens"
    call = ToolCall("weather", '{"city": "Oslo"}', "call_abc")
    used = message_body("m", "m", Delta("", "tool_calls", usage), [call])
    assert used["stop_reason"] == "tool_use"
    assert used["content"] == [{"type": "tool_use", "id": "toolu_abc", "name": "weather", "input": {"city": "Oslo"}}]


def test_a_streamed_message_opens_closes_and_numbers_its_blocks() -> None:
    events = MessageEvents("msg-1", "m")
    call = ToolCall("weather", '{"city": "Oslo"}', "call_abc")
    stream = [events.start()]
    stream += events.events(Delta("Let me"), [])
    stream += events.events(Delta(" check."), [])
    stream += events.events(Delta("", "tool_calls", Usage(7, 9)), [call])
    kinds = [(e["type"], e.get("index")) for e in stream]
    assert kinds == [
        ("message_start", None),
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert stream[5]["content_block"] == {"type": "tool_use", "id": "toolu_abc", "name": "weather", "input": {}}
    assert json.loads(stream[6]["delta"]["partial_json"]) == {"city": "Oslo"}
    assert stream[8]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert stream[8]["usage"]["input_tokens"] == 7 and stream[8]["usage"]["output_tokens"] == 9
    assert named_sse_event(stream[-1]) == b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def test_errors_take_anthropic_s_shape_and_type_by_status() -> None:
    assert error_body(InvalidRequest("bad")) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "bad"},
    }
    kinds = [error_body(e)["error"]["type"] for e in (Unauthorized("k"), ModelNotFound("m"), Overloaded("o"))]
    assert kinds == ["authentication_error", "not_found_error", "overloaded_error"]
