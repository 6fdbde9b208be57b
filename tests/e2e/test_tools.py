"""Tool calls through the real stack, on both engines, with the SDK and LangChain.

The demo models' chat templates know no tools, so these requests also exercise the fallback
(tools in a system message, calls and results as Hermes-style text). ``required`` and named
calls are constrained, so even random weights give calls whose arguments match the schema;
``auto`` leaves the random model free, so there it is the path, not a call, that is checked.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.e2e.conftest import ServeApp, chat

pytestmark = pytest.mark.e2e

ENGINES = ["tiny", "vision"]  # llama.cpp, vLLM
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function",
     "function": {"name": "get_weather", "description": "Weather now.", "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "description": "The time now."}},
]  # fmt: skip
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


def check_call(name: str, arguments: str) -> None:
    assert name in ("get_weather", "get_time")
    jsonschema.validate(json.loads(arguments), WEATHER_PARAMETERS if name == "get_weather" else NO_ARGUMENTS)


@pytest.mark.parametrize("model", ENGINES)
def test_required_gives_valid_calls(client: openai.OpenAI, model: str) -> None:
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS,
        tool_choice="required", parallel_tool_calls=False, max_tokens=200, seed=4,
    )  # fmt: skip
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls  # parallel_tool_calls=False: exactly one
    assert call.id.startswith("call_") and call.type == "function"
    check_call(call.function.name, call.function.arguments)


@pytest.mark.parametrize("model", ENGINES)
def test_a_named_function_streams_as_tool_call_deltas(client: openai.OpenAI, model: str) -> None:
    chunks = list(
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS, max_tokens=200,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True,
        )
    )  # fmt: skip
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for delta_call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta_call.index, {"name": "", "arguments": ""})
            call["name"] += delta_call.function.name or ""
            call["arguments"] += delta_call.function.arguments or ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert [c["name"] for c in calls.values()] == ["get_weather"]
    check_call("get_weather", calls[0]["arguments"])


@pytest.mark.parametrize("model", ENGINES)
def test_a_conversation_with_calls_and_results_continues(client: openai.OpenAI, model: str) -> None:
    """auto, after a call and its result: the templates (or the fallback) render both, and the
    random model answers in text (it has no reason to emit a call's format)."""
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 3}'},
    ]  # fmt: skip
    response = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=16, seed=1)
    choice = response.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.tool_calls is None
    assert response.usage.prompt_tokens > 60  # the tools and the call's result are in the prompt


def test_langchain_bind_tools(app: ServeApp) -> None:
    from langchain_openai import ChatOpenAI

    class GetWeather(BaseModel):
        """Weather now in a city."""

        city: str = Field(max_length=10)
        unit: Literal["celsius", "fahrenheit"]

    llm = ChatOpenAI(model="tiny", base_url=f"{app.base_url}/v1", api_key="unused", max_tokens=200, max_retries=0)
    message = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke("Weather in Oslo?")
    (call,) = message.tool_calls
    assert call["name"] == "GetWeather"
    GetWeather.model_validate(call["args"])


def test_tool_choice_naming_no_offered_tool_is_a_400(app: ServeApp) -> None:
    body = chat("tiny", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_news"}})
    response = app.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert "tool_choice: function 'get_news' is not in tools" in response.json()["error"]["message"]
