"""OpenAI's Responses API end to end, with the official ``openai`` SDK, on both engines."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.e2e.conftest import ServeApp, poll
from tests.e2e.test_vision import RED

pytestmark = pytest.mark.e2e

ENGINES = ["tiny", "vision"]  # llama.cpp, vLLM
WEATHER = {
    "type": "function",
    "name": "city_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}


class Pet(BaseModel):
    """Bounded, so that a random model's JSON ends within the tokens given."""

    name: str = Field(max_length=12)
    kind: Literal["cat", "dog"]


@pytest.mark.parametrize("model", ENGINES)
def test_create_and_stream_give_the_same_kind_of_response(client: openai.OpenAI, model: str) -> None:
    response = client.responses.create(model=model, input="Say hello.", instructions="Be brief.", max_output_tokens=12)
    assert response.object == "response" and response.status in ("completed", "incomplete")
    assert response.output_text and response.output[0].type == "message"
    assert response.usage.input_tokens > 3 and 0 < response.usage.output_tokens <= 12
    request = {"model": model, "input": "Say hello.", "instructions": "Be brief.", "max_output_tokens": 12}
    with client.responses.stream(**request) as stream:
        events = list(stream)
    # Cut by max_output_tokens, a response ends "incomplete" (as OpenAI's do), else "completed".
    final = events[-1].response
    assert events[-1].type == f"response.{final.status}"
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert deltas and final.output_text == "".join(deltas)
    assert final.usage.input_tokens == response.usage.input_tokens


@pytest.mark.parametrize("model", ENGINES)
def test_structured_output_parses_into_the_model(client: openai.OpenAI, model: str) -> None:
    parsed = client.responses.parse(model=model, input="A pet, as JSON.", text_format=Pet, max_output_tokens=200)
    assert parsed.status == "completed"
    assert isinstance(parsed.output_parsed, Pet)


@pytest.mark.parametrize("model", ENGINES)
def test_a_forced_function_call_validates_and_its_output_goes_back(client: openai.OpenAI, model: str) -> None:
    question = [{"role": "user", "content": "Weather in Oslo?"}]
    response = client.responses.create(
        model=model,
        input=question,
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "city_weather"},
        max_output_tokens=96,
    )
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.name == "city_weather" and call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    answer = client.responses.create(
        model=model,
        input=[
            *question,
            *response.output,
            {"type": "function_call_output", "call_id": call.call_id, "output": "-3 C"},
        ],
        tools=[WEATHER],
        max_output_tokens=8,
    )
    assert answer.output and answer.usage.input_tokens > response.usage.input_tokens


def test_an_image_goes_to_the_vision_model(client: openai.OpenAI) -> None:
    content = [{"type": "input_text", "text": "What is in this image?"}, {"type": "input_image", "image_url": RED}]
    with_image = client.responses.create(
        model="vision", input=[{"role": "user", "content": content}], max_output_tokens=4
    )
    text_only = client.responses.create(
        model="vision", input=[{"role": "user", "content": content[:1]}], max_output_tokens=4
    )
    assert with_image.usage.input_tokens > text_only.usage.input_tokens


def test_stateless_and_bad_input_are_400s_that_say_so(client: openai.OpenAI) -> None:
    for extra, fragment in [
        ({"store": True}, "keeps no responses"),
        ({"previous_response_id": "resp_1"}, "send the conversation in input"),
        ({"tools": [{"type": "web_search"}]}, "tools.0"),
    ]:
        with pytest.raises(openai.BadRequestError, match=fragment):
            client.responses.create(model="tiny", input="hi", **extra)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input="hi")


def test_a_client_that_leaves_mid_stream_stops_the_engine(app: ServeApp, client: openai.OpenAI) -> None:
    stream = client.responses.create(
        model="medium", input="Tell a long story.", max_output_tokens=1500, stream=True, extra_body={"ignore_eos": True}
    )
    with stream:
        next(event for event in stream if event.type == "response.output_text.delta")
        assert app.active_generations("medium") == 1
    poll(lambda: app.active_generations("medium") == 0, 5, "medium to stop generating")
