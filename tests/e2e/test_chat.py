"""The OpenAI chat API through the real stack: HTTP -> router -> Serve handle -> llama.cpp."""

from __future__ import annotations

import json

import openai
import pytest

from tests.e2e.conftest import ServeApp, chat

pytestmark = pytest.mark.e2e


def test_non_streaming_completion_with_usage(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=12, temperature=0
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 5
    assert 1 <= response.usage.completion_tokens <= 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert response.id.startswith("chatcmpl-")


def test_streaming_matches_non_streaming_and_reports_usage_last(client: openai.OpenAI) -> None:
    request = dict(model="tiny", messages=[{"role": "user", "content": "tell me"}], max_tokens=20, seed=7)
    whole = client.chat.completions.create(**request, temperature=0)
    chunks = list(
        client.chat.completions.create(**request, temperature=0, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_a_fast_stream_arrives_in_fewer_chunks_than_tokens_and_loses_nothing(client: openai.OpenAI) -> None:
    """Coalescing (stream_interval_s, 50 ms by default): the medium model's ~10 ms tokens reach
    the client a few per chunk, every token accounted for. The stream checks itself: each token's
    logprob entry rides in the chunk that carries its text (a second, non-streamed generation to
    compare with could differ anyway: a different prefix-cache state flips near-tied tokens)."""
    chunks = list(
        client.chat.completions.create(
            model="medium",
            messages=[{"role": "user", "content": "tell me"}],
            max_tokens=80,
            seed=3,
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    carrying = [c.choices[0] for c in chunks if c.choices and c.choices[0].logprobs]
    tokens = [t for choice in carrying for t in choice.logprobs.content]  # type: ignore[union-attr]
    assert len(tokens) == chunks[-1].usage.completion_tokens == 80  # type: ignore[union-attr]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).encode()
    assert b"".join(bytes(t.bytes) for t in tokens) == streamed  # type: ignore[arg-type]
    assert len(carrying) < 80 / 2, f"{len(carrying)} chunks for 80 tokens: the stream was not coalesced"


def test_ignore_eos_generates_exactly_max_tokens(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "go"}], max_tokens=40, extra_body={"ignore_eos": True}
    )
    assert response.usage.completion_tokens == 40
    assert response.choices[0].finish_reason == "length"


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        response = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=24, temperature=1.0, seed=seed
        )
        return response.choices[0].message.content

    assert sample(3) == sample(3)
    assert len({sample(s) for s in range(4)}) > 1


def test_stop_sequence_ends_the_text_before_it(client: openai.OpenAI) -> None:
    reference = (
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "x"}],
            max_tokens=30,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .message.content
    )
    stop = reference[len(reference) // 2 : len(reference) // 2 + 3]
    assert stop.strip(), reference
    stopped = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=30,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == reference[: reference.index(stop)]


def test_models_lists_model_info(app: ServeApp, client: openai.OpenAI) -> None:
    models = {m.id: m.model_dump() for m in client.models.list()}
    assert set(models) == {"tiny", "medium", "embed", "vision", "vision-fp8"}
    tiny = models["tiny"]
    assert tiny["object"] == "model"
    assert tiny["kind"] == "gguf"
    assert tiny["name"] == "tiny-llama-Q4_K_M"
    assert tiny["quantization"] == "Q4_K_M"
    assert tiny["size_bytes"] == (app.models_dir / "tiny-llama-Q4_K_M.gguf").stat().st_size
    assert tiny["context_length"] == 2048
    assert tiny["supports_vision"] is False
    assert tiny["status"] == "loaded"


def test_healthz(app: ServeApp) -> None:
    assert app.http.get("/healthz").json() == {"status": "ok"}


def test_unknown_model_is_404_listing_the_models(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found"
    assert "medium, tiny" in info.value.body["message"]


def test_image_to_a_text_model_is_400_naming_the_vision_models(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    ],
                }
            ],
        )
    assert info.value.body["code"] == "images_not_supported"
    assert "does not accept images" in info.value.body["message"]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
        (b"not json at all", 400, "not valid JSON"),
        (json.dumps({"model": "tiny"}).encode(), 400, "messages: Field required"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 400, "model: Field required"),
        (json.dumps(chat(messages=[])).encode(), 400, "messages"),
        (json.dumps(chat(messages=[{"role": "robot", "content": "x"}])).encode(), 400, "messages.0.role"),
        (json.dumps(chat(temperature=9)).encode(), 400, "temperature"),
        (json.dumps(chat(max_tokens=-1)).encode(), 400, "max_tokens"),
        (json.dumps(chat(max_tokens=10**6)).encode(), 400, "below the context size"),
        (json.dumps(chat(temprature=0.5)).encode(), 400, "temprature: unknown field"),
        (json.dumps(chat(chunk_timeout_s=10**5)).encode(), 400, "exceeds the maximum"),
        (json.dumps(chat(n=0)).encode(), 400, "n:"),
    ],
)
def test_bad_requests_get_a_400_saying_what_to_fix(app: ServeApp, body: bytes, status: int, fragment: str) -> None:
    response = app.http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"]
    assert error["type"] == "invalid_request_error"


def test_a_prompt_longer_than_the_context_is_400_before_streaming(app: ServeApp) -> None:
    long = " ".join(["word"] * 3000)
    response = app.http.post("/v1/chat/completions", json=chat(content=long, stream=True, max_tokens=8))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
