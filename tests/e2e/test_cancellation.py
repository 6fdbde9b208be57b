"""Cancellation stops the engine, not only the router: checked by the replica's own count."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from ray import serve

from tests.e2e.conftest import APP_NAME, ServeApp, chat, poll

pytestmark = pytest.mark.e2e

LONG = {"max_tokens": 1500, "ignore_eos": True}  # ~15 s of generation unless stopped


def wait_until_generating(app: ServeApp, model: str = "medium") -> None:
    poll(lambda: app.active_generations(model) == 1, 10, f"{model} to start generating")


def assert_engine_stops_and_serves_again(app: ServeApp, model: str = "medium") -> None:
    stopped_in = poll(lambda: app.active_generations(model) == 0, 5, f"{model} to stop generating")
    assert stopped_in < 1, f"the engine kept generating for {stopped_in:.2f}s after the cancel"
    # The next request is served at once, not after the abandoned generation.
    response = app.http.post("/v1/chat/completions", json=chat(model, max_tokens=5), timeout=5)
    assert response.status_code == 200


def test_client_disconnect_mid_stream_stops_the_engine(app: ServeApp, ingress_url: str) -> None:
    with httpx.Client(base_url=ingress_url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=chat("medium", stream=True, **LONG)) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: ") and '"content"' in line:
                    break
            card = app.model_card("medium")
            assert (card["active_generations"], card["idle_since"]) == (1, None)
            closing_at = time.time()
    # Leaving both blocks closed the connection mid-stream.
    poll(lambda: app.active_generations("medium") == 0, 5, "medium to stop generating")
    # The engine's own record of when it stopped: after the client went away, not before.
    assert closing_at < app.model_card("medium")["idle_since"] < time.time()
    assert_engine_stops_and_serves_again(app)


def test_client_disconnect_on_a_non_streaming_request_stops_the_engine(app: ServeApp, ingress_url: str) -> None:
    def abandon() -> None:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{ingress_url}/v1/chat/completions", json=chat("medium", **LONG), timeout=1.0)

    caller = threading.Thread(target=abandon)
    caller.start()
    wait_until_generating(app)
    caller.join()
    assert_engine_stops_and_serves_again(app)


def test_cancelling_the_handle_response_stops_the_engine(app: ServeApp) -> None:
    router = serve.get_app_handle(APP_NAME)
    stream = router.options(stream=True).infer_stream.remote(chat("medium", **LONG))
    next(stream)
    wait_until_generating(app)
    stream.cancel()
    assert_engine_stops_and_serves_again(app)


def test_a_request_cancelled_while_queued_never_runs(app: ServeApp) -> None:
    """Two streams on one single-generation replica: the queued one is dropped on cancel."""
    router = serve.get_app_handle(APP_NAME).options(stream=True)
    running = router.infer_stream.remote(chat("medium", **LONG))
    next(running)
    queued = router.infer_stream.remote(chat("medium", **LONG))
    queued.cancel()
    running.cancel()
    assert_engine_stops_and_serves_again(app)
