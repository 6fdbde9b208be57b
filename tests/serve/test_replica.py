"""The replica on Serve with the fake engine: the stream contract, load states, cancellation."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import openai
import pytest
from ray import serve

from tests.conftest import poll
from tests.fakes import Script, scripted
from tests.serve.conftest import APP, FakeApp, fake_config

SLOW = Script(tokens=[f" t{i}" for i in range(200)], delay_s=0.05)


def sse_events(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def stream_until_first_token(fake_app: FakeApp, body: dict[str, Any], then: Any) -> list[str]:
    """Open a stream, run ``then()`` once its first token arrived, return the remaining events."""
    with fake_app.http.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        next(line for line in lines if '"content":" t0' in line)
        then()
        return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def set_loaded(loaded: bool, model: str = "fake") -> None:
    """What Serve does on a user_config change, on the model's one replica."""
    serve.get_deployment_handle(f"model-{model}", APP).reconfigure.remote({"loaded": loaded}).result(timeout_s=30)


def test_a_complete_stream_ends_with_finish_reason_and_usage(fake_app: FakeApp, client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(**scripted(stream=True, stream_options={"include_usage": True})))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello, world"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


@pytest.mark.parametrize("stream", [True, False])
def test_an_answer_of_no_tokens_is_an_empty_answer(fake_app: FakeApp, stream: bool) -> None:
    """The model ended at once (end of generation first): no content, usage of 0, still a 200."""
    response = fake_app.http.post("/v1/chat/completions", json=scripted(Script(tokens=[]), stream=stream))
    assert response.status_code == 200, response.text
    if not stream:
        assert response.json()["choices"][0]["message"]["content"] == ""
        assert response.json()["usage"]["completion_tokens"] == 0


@pytest.mark.parametrize("stream", [True, False])
def test_a_stream_the_engine_ends_without_finishing_is_an_error_not_a_short_answer(
    fake_app: FakeApp, stream: bool
) -> None:
    body = scripted(Script(end="truncate"), stream=stream)
    response = fake_app.http.post("/v1/chat/completions", json=body)
    if stream:
        events = response.text.strip().split("\n\n")
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
    else:
        assert response.status_code == 502
        error = response.json()["error"]
    assert error["code"] == "generation_incomplete"


def test_unloading_while_streaming_ends_the_stream_with_an_error(fake_app: FakeApp) -> None:
    try:
        events = stream_until_first_token(fake_app, scripted(SLOW), lambda: set_loaded(False))
    finally:
        set_loaded(True)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "model_unloaded" and "unloaded during the generation" in error["message"]
    assert not any('"finish_reason":"stop"' in e for e in events)


def test_unloading_during_a_non_streaming_request_is_a_503(fake_app: FakeApp) -> None:
    outcome: dict[str, httpx.Response] = {}
    caller = threading.Thread(
        target=lambda: outcome.setdefault("r", fake_app.http.post("/v1/chat/completions", json=scripted(SLOW)))
    )
    caller.start()
    try:
        poll(lambda: fake_app.card()["active_generations"] == 1, 10, "the request to reach the engine")
        set_loaded(False)
        caller.join(timeout=30)
    finally:
        set_loaded(True)
    assert outcome["r"].status_code == 503
    assert outcome["r"].json()["error"]["code"] == "model_unloaded"


@pytest.mark.parametrize(
    ("fail", "status", "code"),
    [("bug", 500, "internal_error"), ("engine", 502, "inference_failed"), ("invalid", 400, "invalid_request")],
)
def test_failures_mid_stream_say_what_happened_and_leak_nothing(
    fake_app: FakeApp, fail: str, status: int, code: str
) -> None:
    script = Script(fail_after=2, fail=fail)  # type: ignore[arg-type]
    response = fake_app.http.post("/v1/chat/completions", json=scripted(script))
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code
    assert "secret internal detail" not in response.text and "KeyError" not in response.text
    if fail == "bug":  # the request id finds the details in the log
        assert response.headers["x-request-id"] in error["message"]
    streamed = fake_app.http.post("/v1/chat/completions", json=scripted(script, stream=True))
    events = streamed.text.strip().split("\n\n")
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == code
    assert "secret internal detail" not in streamed.text


def test_a_client_that_disconnects_stops_the_engine(fake_app: FakeApp) -> None:
    before = fake_app.counters()["closed_early"]
    with fake_app.http.stream("POST", "/v1/chat/completions", json=scripted(SLOW, stream=True)) as response:
        next(line for line in response.iter_lines() if '"content":" t0' in line)
    poll(lambda: fake_app.counters()["closed_early"] == before + 1, 10, "the engine to stop the generation")
    assert fake_app.card()["active_generations"] == 0


def test_a_model_whose_load_raises_anything_is_failed_with_the_reason(fake_app: FakeApp) -> None:
    config = fake_config(fake_app.gguf, broken={"deployment": {"max_constructor_retry_count": 1, "num_replicas": 1}})
    fake_app.redeploy(config, wait=False)
    try:
        # Until the new router runs, the old one answers without a card for "broken".
        poll(lambda: fake_app.cards().get("broken", {}).get("status") == "failed", 60, "the broken model's failure")
        card = fake_app.card("broken")
        assert "RuntimeError: the weights are corrupt" in card["error"]
        # What the file says, as for a loaded model.
        loaded = fake_app.card("fake")
        assert {k: card[k] for k in ("name", "size_bytes", "quantization")} == {
            k: loaded[k] for k in ("name", "size_bytes", "quantization")
        }
        assert card["quantization"] == "Q4_K_M" and card["name"] == "fake-model-Q4_K_M"
    finally:
        fake_app.redeploy(fake_config(fake_app.gguf))


def test_a_loading_model_shows_what_its_file_says(fake_app: FakeApp) -> None:
    fake_app.redeploy(fake_config(fake_app.gguf, **{"slow-load": {}}), wait=False)
    try:
        poll(lambda: fake_app.cards().get("slow-load", {}).get("status") == "loading", 60, "the loading card")
        card, loaded = fake_app.card("slow-load"), fake_app.card("fake")
        assert {k: card[k] for k in ("name", "size_bytes", "quantization", "context_length")} == {
            k: loaded[k] for k in ("name", "size_bytes", "quantization", "context_length")
        }
    finally:
        fake_app.redeploy(fake_config(fake_app.gguf))
