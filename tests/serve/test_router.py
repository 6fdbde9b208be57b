"""The router on Serve with the fake engine: HTTP framing, error bodies, deadlines, model cards."""

from __future__ import annotations

import json

import openai
import pytest

from tests.fakes import Script, scripted
from tests.serve.conftest import FakeApp


def test_sse_frames_are_chunks_then_done(fake_app: FakeApp) -> None:
    response = fake_app.http.post("/v1/chat/completions", json=scripted(stream=True))
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_an_error_before_the_first_chunk_is_a_real_status(fake_app: FakeApp) -> None:
    response = fake_app.http.post("/v1/chat/completions", json=scripted(Script(fail_after=0), stream=True))
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"


@pytest.mark.parametrize(
    ("script", "code"),
    [
        (Script(first_delay_s=5), "first_chunk_timeout"),
        (Script(stall_after=1), "chunk_timeout"),
        (Script(tokens=["x"] * 100, delay_s=0.1), "request_timeout"),
    ],
)
def test_each_deadline_ends_the_request_and_names_itself(fake_app: FakeApp, script: Script, code: str) -> None:
    deadlines = {"first_chunk_timeout_s": 1, "chunk_timeout_s": 1, "request_timeout_s": 2}
    response = fake_app.http.post("/v1/chat/completions", json=scripted(script, **deadlines))
    assert response.status_code == 504
    assert response.json()["error"]["code"] == code


@pytest.mark.parametrize(
    ("method", "path", "status"), [("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)]
)
def test_routes_that_do_not_exist_answer_in_openai_shape(
    fake_app: FakeApp, method: str, path: str, status: int
) -> None:
    response = fake_app.http.request(method, path)
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "code"}


def test_the_openai_client_reads_our_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(**scripted() | {"model": "nope"})
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**scripted(Script(fail_after=1, fail="invalid")))


def test_a_loaded_card_says_what_the_file_says(fake_app: FakeApp) -> None:
    card = fake_app.card()
    assert card["status"] == "loaded" and card["replicas"] == {"loaded": 1}
    assert card["name"] == "fake-model-Q4_K_M" and card["quantization"] == "Q4_K_M"
    assert card["size_bytes"] == fake_app.gguf.stat().st_size


def test_tokenize_takes_vllm_s_shape_and_llama_server_s(fake_app: FakeApp) -> None:
    """The fake engine's tokens are its words' lengths; a message's role is a word too."""
    tokenize = fake_app.http.post("/tokenize", json={"model": "fake", "prompt": "ab cde"})
    assert tokenize.json() == {"count": 2, "max_model_len": 2048, "tokens": [2, 3]}
    chat = {"model": "fake", "messages": [{"role": "user", "content": "ab"}]}
    assert fake_app.http.post("/tokenize", json=chat).json()["tokens"] == [4, 2]
    # llama-server's: content, and no model (the app serves one)
    assert fake_app.http.post("/tokenize", json={"content": "abc"}).json()["tokens"] == [3]
    assert fake_app.http.post("/detokenize", json={"tokens": [1, 2]}).json() == {"prompt": "x xx", "content": "x xx"}


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"model": "fake"}, 400, "one of prompt, content or messages"),
        ({"model": "fake", "prompt": "a", "content": "b"}, 400, "one of prompt, content or messages"),
        ({"model": "fake", "prompt": "a", "with_pieces": True}, 400, "with_pieces: unknown field"),
        ({"model": "nope", "prompt": "a"}, 404, "'nope' not found"),
    ],
)
def test_tokenize_says_what_to_fix(fake_app: FakeApp, body: dict[str, object], status: int, fragment: str) -> None:
    response = fake_app.http.post("/tokenize", json=body)
    assert response.status_code == status and fragment in response.json()["error"]["message"]
