import pytest

from deployments.engines.base import Delta, Usage
from deployments.errors import InvalidRequest
from deployments.protocol import ChatCompletionRequest, ChunkFactory, sse_event
from deployments.serving import parse_request


def test_chunks_carry_the_role_first_the_finish_reason_then_usage() -> None:
    factory = ChunkFactory("id-1", "m", include_usage=True)
    chunks = (
        factory.chunks(Delta("Hel"))
        + factory.chunks(Delta("lo"))
        + factory.chunks(Delta("", finish_reason="stop", usage=Usage(3, 2, cached_tokens=1)))
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
        parse_request(b'{"model": 1, "messages": [{"role": "user"}], "stop": ["a","b","c","d","e"], "extra": 1}')
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
