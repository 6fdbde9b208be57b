"""OpenAI's Responses API as chat: the request's translation, the response object and its events."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deployments.engines.base import Delta, Usage
from deployments.errors import InferenceFailed, InvalidRequest
from deployments.protocol.chat import ChatCompletionRequest
from deployments.protocol.responses import ResponseBuilder, ResponsesRequest
from deployments.serving.core import parse_request
from deployments.tools import ToolCall

WEATHER = {"type": "function", "name": "weather", "parameters": {"type": "object"}}
CALL = ToolCall("weather", '{"city": "Oslo"}', "call_abc")


def responses(**fields: Any) -> ResponsesRequest:
    return parse_request({"model": "m", "input": "hi"} | fields, ResponsesRequest)


def test_a_string_input_with_instructions_is_a_system_and_a_user_message() -> None:
    chat = responses(instructions="Be brief.", max_output_tokens=9, temperature=0.2).chat_request()
    assert chat["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert (chat["max_tokens"], chat["temperature"]) == (9, 0.2)


def test_a_function_call_loop_becomes_the_chat_it_means() -> None:
    request = responses(
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            # an earlier response's output items, sent back as they were
            {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
             "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
            {"type": "function_call", "id": "fc_abc", "call_id": "call_abc", "name": "weather",
             "arguments": '{"city": "Oslo"}', "status": "completed"},
            {"type": "function_call_output", "call_id": "call_abc", "output": "-3 C"},
        ],
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "weather"},
        text={"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}}},
    )  # fmt: skip
    chat = request.chat_request()
    assert chat["messages"] == [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "call_abc", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": "-3 C"},
    ]
    assert chat["tools"] == [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "out", "schema": {"type": "object"}},
    }


def test_images_become_image_parts() -> None:
    content = [
        {"type": "input_text", "text": "What?"},
        {"type": "input_image", "image_url": "data:image/png;base64,AA"},
    ]
    chat = responses(input=[{"role": "user", "content": content}]).chat_request()
    assert chat["messages"][0]["content"] == [
        {"type": "text", "text": "What?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
    ]


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"store": True}, "store: this server keeps no responses"),
        ({"previous_response_id": "resp_1"}, "send the conversation in input"),
        ({"tools": [{"type": "web_search"}]}, "tools.0"),
        ({"reasoning": {"effort": "high"}}, "reasoning: unknown field"),
        ({"input": [{"type": "input_file", "file_id": "f"}]}, "input"),
    ],
)
def test_what_the_api_refuses_is_a_400_that_names_the_field(fields: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidRequest, match=fragment):
        responses(**fields)


def test_its_chat_request_is_one_the_chat_layer_takes() -> None:
    request = responses(input=[{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "hi"}])
    assert parse_request(request.chat_request(), ChatCompletionRequest).messages[0].role == "developer"


def test_a_response_object_holds_text_calls_usage_and_the_request_s_settings() -> None:
    request = responses(tools=[WEATHER], max_output_tokens=5)
    body = ResponseBuilder("resp-1", "m", request).whole(Delta("Sure.", "tool_calls", Usage(7, 3, 2)), [CALL])
    assert (body["object"], body["status"], body["model"]) == ("response", "completed", "m")
    message, call = body["output"]
    assert message["content"] == [{"type": "output_text", "text": "Sure.", "annotations": [], "logprobs": []}]
    assert call == {"type": "function_call", "id": "fc_abc", "call_id": "call_abc", "name": "weather",
                    "arguments": '{"city": "Oslo"}', "status": "completed"}  # fmt: skip
    assert body["usage"]["input_tokens_details"] == {"cached_tokens": 2} and body["usage"]["total_tokens"] == 10
    assert (body["max_output_tokens"], body["store"], body["tools"][0]["name"]) == (5, False, "weather")
    cut = ResponseBuilder("resp-2", "m", request).whole(Delta("…", "length", Usage(7, 5)), [])
    assert (cut["status"], cut["incomplete_details"]) == ("incomplete", {"reason": "max_output_tokens"})


def test_a_streamed_response_numbers_its_events_and_ends_completed() -> None:
    builder = ResponseBuilder("resp-1", "m", responses(tools=[WEATHER]))
    events = builder.start() + builder.events(Delta("Let"), []) + builder.events(Delta(" me."), [])
    events += builder.events(Delta("", "tool_calls", Usage(7, 3)), [CALL])
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[6]["text"] == "Let me." and json.loads(events[11]["arguments"]) == {"city": "Oslo"}
    final = events[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["message", "function_call"]
    assert final["output"][0]["id"] == events[2]["item"]["id"] == events[4]["item_id"]


def test_a_failure_after_the_first_event_ends_the_stream_with_error_and_failed() -> None:
    builder = ResponseBuilder("resp-1", "m", responses())
    builder.start()
    error, failed = builder.failed(InferenceFailed("the engine failed"))
    assert (error["type"], error["code"], error["sequence_number"]) == ("error", "inference_failed", 2)
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"] == {"code": "inference_failed", "message": "the engine failed"}
