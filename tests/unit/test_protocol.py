import json
from typing import Any

import pytest

from deployments.engines.base import Delta, Embeddings, JsonOutput, TokenLogprob, Usage
from deployments.engines.llama_sampling import json_grammar
from deployments.errors import InvalidRequest
from deployments.protocol.chat import ChatCompletionRequest, ChunkFactory, chat_choice, json_output
from deployments.protocol.common import sse_event
from deployments.protocol.embeddings import EmbeddingRequest, embeddings_body
from deployments.serving.core import parse_request


def parse_chat(raw: Any) -> ChatCompletionRequest:
    return parse_request(raw, ChatCompletionRequest)


def test_chunks_carry_the_role_first_the_finish_reason_then_usage() -> None:
    factory = ChunkFactory("id-1", "m", include_usage=True)
    chunks = (
        factory.chunks(Delta("Hel"))
        + factory.chunks(Delta("lo"))
        + factory.chunks(Delta("", finish_reason="stop", usage=Usage(3, 2, cached_tokens=1)))
        + [factory.usage_chunk(Usage(3, 2, cached_tokens=1))]
    )
    assert [c["choices"][0]["delta"] if c["choices"] else None for c in chunks] == [
        {"content": "Hel", "role": "assistant"},
        {"content": "lo"},
        {},
        None,
    ]
    assert chunks[2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 1},
    }
    assert all(c["usage"] is None for c in chunks[:-1])
    assert {c["id"] for c in chunks} == {"id-1"}


def test_an_empty_completion_still_opens_with_the_assistant_role() -> None:
    chunks = ChunkFactory("id", "m", include_usage=False).chunks(Delta("", finish_reason="length", usage=Usage(1, 0)))
    assert chunks[0]["choices"][0]["delta"] == {"content": "", "role": "assistant"}
    assert "usage" not in chunks[0]


def test_sse_framing() -> None:
    assert sse_event({"a": 1}) == b'data: {"a":1}\n\n'


def test_request_validation_names_every_problem() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_chat(b'{"model": 1, "messages": [{"role": "user"}], "stop": ["a","b","c","d","e"], "extra": 1}')
    message = info.value.message
    for fragment in ("model:", "messages.0", "stop", "extra: unknown field"):
        assert fragment in message


def test_content_parts_and_image_detection() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
        }
    )
    assert request.messages[1].text() == "ab"
    assert not request.has_images


BASE = {"model": "m", "messages": [{"role": "user", "content": "x"}]}


def test_response_formats_become_what_the_engines_enforce() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    as_schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    assert json_output(parse_chat(BASE | {"response_format": as_schema}).response_format) == JsonOutput(
        json_schema=schema
    )
    assert json_output(parse_chat(BASE | {"response_format": {"type": "json_object"}}).response_format) == (
        JsonOutput()
    )
    assert json_output(parse_chat(BASE | {"response_format": {"type": "text"}}).response_format) is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "objet"}}}},
         "not a valid JSON schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}}, "name"),
        ({"audio": {"voice": "x"}, "prediction": {"type": "content"}},
         "audio, prediction: not supported by this server"),
        ({"modalities": ["text", "audio"]}, "modalities: not supported by this server"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"top_k_": 3}, "top_k_: unknown field"),
        ({"top_logprobs": 3}, "top_logprobs: needs logprobs set to true"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)  # fmt: skip
def test_bad_openai_fields_are_400s_that_name_them(extra: dict, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message.replace(".", r"\.")):
        parse_chat(BASE | extra)


def test_openai_fields_at_their_off_values_are_accepted() -> None:
    off = {"logprobs": False, "tools": [], "tool_choice": None, "modalities": ["text"], "store": False, "user": "u"}
    request = parse_chat(json.dumps(BASE | off))
    assert request.user == "u"


def test_json_object_and_schema_grammars() -> None:
    """llama.cpp's grammars: any object for json_object; a schema's grammar spells its keys."""
    assert "object" in json_grammar(JsonOutput())
    assert '\\"color\\"' in json_grammar(JsonOutput(json_schema={"properties": {"color": {"enum": ["red"]}}}))
    with pytest.raises(InvalidRequest, match="cannot express"):
        json_grammar(JsonOutput(json_schema={"$ref": "https://example.com/schema.json"}))


def test_logprobs_in_chunks_and_whole_answers_take_openais_shape() -> None:
    token = TokenLogprob(b"\xc3", float("-inf"), ((b"a", -0.5),))
    chunk = ChunkFactory("id", "m", include_usage=False).chunks(Delta("", logprobs=(token,)))[0]
    expected = {"token": "\ufffd", "logprob": -9999.0, "bytes": [195], "top_logprobs": [
        {"token": "a", "logprob": -0.5, "bytes": [97]}]}  # fmt: skip
    assert chunk["choices"][0]["logprobs"] == {"content": [expected]}
    final = Delta("", "stop", Usage(1, 1))
    assert chat_choice(0, final, [token])["logprobs"] == {"content": [expected]}
    assert "logprobs" not in chat_choice(0, final, None)
    assert parse_chat(BASE | {"logprobs": True}).logprobs_top == 0
    assert parse_chat(BASE).logprobs_top is None


def test_json_strings_exclude_control_characters() -> None:
    """JSON forbids raw control characters in strings; the converter's grammar allowed them."""
    (char,) = [line for line in json_grammar(JsonOutput()).splitlines() if line.startswith("char ::=")]
    assert char.startswith(r'char ::= [^"\\\x7F\x00-\x1F]')


def test_embedding_inputs_and_bodies() -> None:
    import base64

    import numpy as np

    def inputs(value: object) -> list:
        return parse_request({"model": "e", "input": value}, EmbeddingRequest).inputs

    assert inputs("a") == ["a"]
    assert inputs(["a", "b"]) == ["a", "b"]
    assert inputs([1, 2]) == [[1, 2]]
    assert inputs([[1], [2, 3]]) == [[1], [2, 3]]
    for bad, says in [([], "input"), ({"x": 1}, "input")]:
        with pytest.raises(InvalidRequest, match=says):
            inputs(bad)
    vectors = np.array([[0.6, 0.8]], dtype=np.float32)
    body = embeddings_body("e", Embeddings(vectors, 3), "float")
    assert body["data"] == [{"object": "embedding", "index": 0, "embedding": pytest.approx([0.6, 0.8])}]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    encoded = embeddings_body("e", Embeddings(vectors, 3), "base64")["data"][0]["embedding"]
    assert np.frombuffer(base64.b64decode(encoded), dtype="<f4").tolist() == pytest.approx([0.6, 0.8])
