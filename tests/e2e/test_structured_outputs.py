"""Structured outputs (``response_format``) through the real stack, on both engines; bad options.

The models have random weights: only constrained decoding (llama.cpp's grammar sampler, vLLM's
structured outputs) makes their output parse, so a parse here proves the constraint ran.
Schemas bound their strings and arrays: a random model has no reason to close them early.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.e2e.conftest import ServeApp, chat

pytestmark = pytest.mark.e2e

ENGINES = ["tiny", "vision"]  # llama.cpp, vLLM


class Pet(BaseModel):
    name: str = Field(max_length=12)
    species: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0)
    vaccinated: bool
    tags: list[Annotated[str, Field(max_length=6)]] = Field(max_length=3)


PET_SCHEMA = Pet.model_json_schema()
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET_SCHEMA, "strict": True}}


def content_of(app: ServeApp, body: dict[str, Any]) -> tuple[str, str]:
    """(content, finish_reason) of one request, streamed or not as ``body`` says."""
    if not body.get("stream"):
        response = app.http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]
    parts, reasons = [], []
    with app.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    parts.append(choice["delta"].get("content") or "")
                    reasons.append(choice["finish_reason"])
    return "".join(parts), next(r for r in reasons if r)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("model", ENGINES)
def test_json_schema_output_parses_and_validates(app: ServeApp, model: str, stream: bool) -> None:
    for seed in (1, 2):  # sampled, not greedy: the grammar, not luck, keeps it valid
        body = chat(model, "A pet, please.", response_format=JSON_SCHEMA_FORMAT, max_tokens=300, seed=seed)
        text, finish_reason = content_of(app, body | {"stream": stream})
        assert finish_reason == "stop", text
        jsonschema.validate(json.loads(text), PET_SCHEMA)


@pytest.mark.parametrize("model", ENGINES)
def test_json_object_output_is_an_object(app: ServeApp, model: str) -> None:
    """Any object: nothing bounds its strings, so a random model may run out of tokens inside
    one; every answer it finishes parses, and the seeds are fixed so some do."""
    finished = 0
    for seed in range(1, 6):
        body = chat(model, "Some JSON.", response_format={"type": "json_object"}, max_tokens=200, seed=seed)
        text, finish_reason = content_of(app, body)
        assert text.startswith("{")
        if finish_reason == "stop":
            assert isinstance(json.loads(text), dict), text
            finished += 1
    assert finished


@pytest.mark.parametrize("model", ENGINES)
def test_sdk_parse_returns_the_pydantic_model(client: openai.OpenAI, model: str) -> None:
    completion = client.chat.completions.parse(
        model=model, messages=[{"role": "user", "content": "A pet."}], response_format=Pet, max_tokens=300, seed=3
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, Pet), message.content
    assert completion.choices[0].finish_reason == "stop"


def test_langchain_with_structured_output(app: ServeApp) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="tiny", base_url=f"{app.base_url}/v1", api_key="unused", max_tokens=300, max_retries=0)
    pet = llm.with_structured_output(Pet, method="json_schema").invoke("A pet, please.")
    assert isinstance(pet, Pet)


@pytest.mark.parametrize("model", ENGINES)
def test_max_tokens_cutting_the_json_short_reports_length(app: ServeApp, model: str) -> None:
    _, finish_reason = content_of(app, chat(model, "A pet.", response_format=JSON_SCHEMA_FORMAT, max_tokens=3))
    assert finish_reason == "length"


@pytest.mark.parametrize(
    ("model", "extra", "says"),
    [
        ("tiny", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
         "not a valid JSON schema"),
        ("tiny", {"response_format": {"type": "json_schema",
                                      "json_schema": {"name": "x", "schema": {"$ref": "https://example.com/s.json"}}}},
         "grammar cannot express"),
        ("tiny", {"logit_bias": {"99999999": 1}}, "not in the vocabulary"),
        ("vision", {"logit_bias": {"99999999": 1}}, "99999999"),
        ("tiny", {"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
        ("tiny", {"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"]},
         "audio, modalities: not supported by this server"),
        ("tiny", {"presence_penalty": 3}, "presence_penalty"),
        ("tiny", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("vision", {"messages": [{"role": "tool", "content": "3", "tool_call_id": "call_9"}]},
         "'call_9' answers no tool call"),
        ("tiny", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                   "properties": {"a": {"$ref": "https://example.com/a.json"}}}}}], "tool_choice": "required"},
         "grammar cannot express"),
        ("tiny", {"response_format": {"type": "xml"}}, "response_format"),
    ],
)  # fmt: skip
def test_bad_structured_and_sampling_options_get_400(
    app: ServeApp, model: str, extra: dict[str, Any], says: str
) -> None:
    response = app.http.post("/v1/chat/completions", json=chat(model, max_tokens=4) | extra)
    assert response.status_code == 400, response.text
    assert says in response.json()["error"]["message"]


def test_openai_fields_left_at_their_defaults_are_accepted(app: ServeApp) -> None:
    """What SDKs and frameworks send unasked: off values of fields we do not implement, caller metadata."""
    extra = {"logprobs": False, "tools": [], "modalities": ["text"], "user": "u1", "metadata": {"k": "v"},
             "store": False, "service_tier": "auto", "parallel_tool_calls": None}  # fmt: skip
    response = app.http.post("/v1/chat/completions", json=chat("tiny", max_tokens=2) | extra)
    assert response.status_code == 200, response.text


def test_a_misspelt_extension_is_still_an_unknown_field(app: ServeApp) -> None:
    response = app.http.post("/v1/chat/completions", json=chat("tiny", max_tokens=2, request_timeout=3))
    assert response.status_code == 400
    assert "request_timeout: unknown field" in response.json()["error"]["message"]
