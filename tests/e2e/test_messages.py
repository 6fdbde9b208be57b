"""Anthropic's Messages API end to end, with the official ``anthropic`` SDK, on both engines."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import anthropic
import httpx
import jsonschema
import pytest

from tests.e2e.conftest import ServeApp, poll
from tests.e2e.test_vision import png

pytestmark = pytest.mark.e2e

ENGINES = ["tiny", "vision"]  # llama.cpp, vLLM
HELLO = [{"role": "user", "content": "Say hello."}]
CITY = {
    "name": "city_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        # What both engines' grammars enforce (neither bounds an integer's value).
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "days": {"type": "integer"},
            "unit": {"enum": ["C", "F"]},
        },
        "required": ["city", "days", "unit"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def claude(app: ServeApp) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=app.base_url, api_key="unused", max_retries=0, timeout=120) as client:
        yield client


@pytest.mark.parametrize("model", ENGINES)
def test_create_and_stream_give_a_whole_message(claude: anthropic.Anthropic, model: str) -> None:
    message = claude.messages.create(model=model, max_tokens=16, messages=HELLO)
    assert message.type == "message" and message.role == "assistant" and message.model == model
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 3 and 0 < message.usage.output_tokens <= 16
    # This SDK no longer takes sampling options as arguments; the API still does.
    with claude.messages.stream(model=model, max_tokens=16, messages=HELLO, extra_body={"temperature": 0.7}) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed and final.content[0].text == streamed
    assert final.usage.input_tokens == message.usage.input_tokens and final.usage.output_tokens > 0


@pytest.mark.parametrize("model", ENGINES)
def test_a_stop_sequence_ends_the_message_and_is_named(claude: anthropic.Anthropic, model: str) -> None:
    """The random models write words, so a space comes within a few tokens (which words, greedy,
    can flip between runs on near-tied tokens: the stop is the one thing sure to come)."""
    stopped = claude.messages.create(model=model, max_tokens=32, messages=HELLO, stop_sequences=["  ", " "])
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", " ")
    assert " " not in stopped.content[0].text


@pytest.mark.parametrize("model", ENGINES)
def test_a_forced_tool_use_has_input_that_validates(claude: anthropic.Anthropic, model: str) -> None:
    message = claude.messages.create(
        model=model,
        max_tokens=96,
        messages=[{"role": "user", "content": "Weather in Oslo for 3 days?"}],
        tools=[CITY],
        tool_choice={"type": "tool", "name": "city_weather"},
    )
    assert message.stop_reason == "tool_use"
    (use,) = [b for b in message.content if b.type == "tool_use"]
    assert use.name == "city_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, CITY["input_schema"])
    # The tool's result goes back in the next turn, and the model answers it.
    answer = claude.messages.create(
        model=model,
        max_tokens=8,
        messages=[
            {"role": "user", "content": "Weather in Oslo for 3 days?"},
            {"role": "assistant", "content": message.content},  # echoed as agent loops do
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, -3 C"}]},
        ],
        tools=[CITY],
    )
    assert answer.content and answer.usage.input_tokens > message.usage.input_tokens


@pytest.mark.parametrize("model", ENGINES)
def test_structured_output_is_json_that_matches_the_schema(claude: anthropic.Anthropic, model: str) -> None:
    schema = CITY["input_schema"]
    message = claude.messages.create(
        model=model,
        max_tokens=96,
        messages=[{"role": "user", "content": "A city and a number of days, as JSON."}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )
    assert message.stop_reason == "end_turn"
    jsonschema.validate(json.loads(message.content[0].text), schema)


def test_an_image_goes_to_the_vision_model(claude: anthropic.Anthropic) -> None:
    image = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(png("red")).decode()}
    content = [{"type": "image", "source": image}, {"type": "text", "text": "What is in this image?"}]
    with_image = claude.messages.create(model="vision", max_tokens=4, messages=[{"role": "user", "content": content}])
    text_only = claude.messages.create(
        model="vision", max_tokens=4, messages=[{"role": "user", "content": content[1:]}]
    )
    assert with_image.usage.input_tokens > text_only.usage.input_tokens  # the image's tokens are in the prompt


@pytest.mark.parametrize("model", ENGINES)
def test_count_tokens_is_what_the_message_takes(claude: anthropic.Anthropic, model: str) -> None:
    request = {"model": model, "messages": HELLO, "system": "Be brief.", "tools": [CITY]}
    counted = claude.messages.count_tokens(**request)
    assert counted.input_tokens == claude.messages.create(**request, max_tokens=1).usage.input_tokens


def test_errors_come_in_anthropic_s_shape(app: ServeApp, claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="no-such-model", max_tokens=4, messages=HELLO)
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    raw = app.http.post("/v1/messages", json={"model": "tiny", "messages": HELLO})
    assert raw.status_code == 400
    assert raw.json()["type"] == "error" and "max_tokens" in raw.json()["error"]["message"]
    with pytest.raises(anthropic.BadRequestError, match="cannot count the tokens of images"):
        image = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
        claude.messages.count_tokens(model="vision", messages=[{"role": "user", "content": [image]}])
    late = app.http.post(
        "/v1/messages",
        json={"model": "medium", "max_tokens": 500, "messages": HELLO, "ignore_eos": True, "request_timeout_s": 0.3},
    )
    assert late.status_code == 504 and late.json()["error"]["type"] == "timeout_error"


def test_a_client_that_leaves_mid_stream_stops_the_engine(app: ServeApp) -> None:
    body = {"model": "medium", "max_tokens": 1500, "messages": HELLO, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=app.base_url, timeout=30) as http:
        with http.stream("POST", "/v1/messages", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(lines) == "event: message_start"
            next(line for line in lines if line.startswith("event: content_block_delta"))
            assert app.active_generations("medium") == 1
    poll(lambda: app.active_generations("medium") == 0, 5, "medium to stop generating")
