"""The three deadlines through the real stack, on the medium model (~10 ms per token)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import ServeApp, chat, e2e_config, poll

pytestmark = pytest.mark.e2e

LONG = {"max_tokens": 1500, "ignore_eos": True}  # ~15 s of generation unless stopped


def engine_goes_idle(app: ServeApp, model: str = "medium") -> float:
    return poll(lambda: app.active_generations(model) == 0, 5, f"{model} to stop generating")


def test_first_chunk_deadline_is_a_504_before_any_byte(app: ServeApp) -> None:
    response = app.http.post(
        "/v1/chat/completions", json=chat("medium", stream=True, first_chunk_timeout_s=0.001, **LONG)
    )
    assert response.status_code == 504
    assert response.json()["error"] == {
        "message": response.json()["error"]["message"],
        "type": "timeout_error",
        "code": "first_chunk_timeout",
    }
    assert "first_chunk_timeout_s" in response.json()["error"]["message"]
    assert engine_goes_idle(app) < 1


def test_chunk_deadline_after_the_first_chunk_is_an_sse_error_event(app: ServeApp, client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="medium",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        max_tokens=1500,
        extra_body={"ignore_eos": True, "chunk_timeout_s": 0.005},
    )
    received = 0
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            received += 1
    assert received >= 1  # the stream had started: the error came as an event, not a status
    assert info.value.body["code"] == "chunk_timeout"
    assert info.value.body["type"] == "timeout_error"
    assert engine_goes_idle(app) < 1


def test_the_sse_error_event_is_followed_by_done(app: ServeApp) -> None:
    with app.http.stream(
        "POST", "/v1/chat/completions", json=chat("medium", stream=True, chunk_timeout_s=0.005, **LONG)
    ) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "chunk_timeout"
    assert all("error" not in json.loads(e.removeprefix("data: ")) for e in events[:-2])


def test_request_deadline_non_streaming_is_a_504(app: ServeApp) -> None:
    started = time.monotonic()
    response = app.http.post("/v1/chat/completions", json=chat("medium", request_timeout_s=0.5, **LONG))
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "request_timeout"
    assert time.monotonic() - started < 5  # it did not run the 15 s generation to the end
    assert engine_goes_idle(app) < 1


def test_request_deadline_mid_stream(client: openai.OpenAI, app: ServeApp) -> None:
    with pytest.raises(openai.APIError) as info:
        for _ in client.chat.completions.create(
            model="medium",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            max_tokens=1500,
            extra_body={"ignore_eos": True, "request_timeout_s": 0.5},
        ):
            pass
    assert info.value.body["code"] == "request_timeout"
    assert engine_goes_idle(app) < 1


def test_a_stream_longer_than_its_chunk_deadline_in_total_passes_untouched(client: openai.OpenAI) -> None:
    started = time.monotonic()
    chunks = list(
        client.chat.completions.create(
            model="medium",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            max_tokens=150,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "chunk_timeout_s": 0.5},
        )
    )
    assert time.monotonic() - started > 0.5  # the total ran past the idle bound
    assert chunks[-1].usage.completion_tokens == 150
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_deadline_defaults_come_from_the_model_config(app: ServeApp) -> None:
    """A model whose default chunk deadline is tiny times out without any per-request override."""
    strict = {"deadlines": {"default": {"first_chunk_timeout_s": 60, "chunk_timeout_s": 0.0001}}}
    with app.side_app("strict", e2e_config(app.models_dir, tiny=strict, vision=False)) as base_url:
        response = httpx.post(f"{base_url}/v1/chat/completions", json=chat("tiny", max_tokens=200, ignore_eos=True))
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "chunk_timeout"
        # The request can still ask for more, up to the configured maximum.
        relaxed = httpx.post(
            f"{base_url}/v1/chat/completions", json=chat("tiny", max_tokens=20, ignore_eos=True, chunk_timeout_s=10)
        )
        assert relaxed.status_code == 200, relaxed.text
