"""A full model queue answers 503 with Retry-After at once, never an unbounded wait."""

from __future__ import annotations

import httpx
import pytest
from ray import serve

from tests.e2e.conftest import ServeApp, chat, e2e_config

pytestmark = pytest.mark.e2e

LONG = {"max_tokens": 1500, "ignore_eos": True}
SIDE = "backpressure"


def test_past_max_queued_requests_the_answer_is_503_with_retry_after(app: ServeApp) -> None:
    one_slot = {
        "num_replicas": 1,
        "max_ongoing_requests": 1,
        "max_queued_requests": 1,
        "ray_actor_options": {"num_cpus": 1},
    }
    config = e2e_config(app.models_dir, medium={"deployment": one_slot}, vision=False)
    with app.side_app(SIDE, config) as base_url:
        router = serve.get_app_handle(SIDE).options(stream=True)
        running = router.infer_stream.remote(chat("medium", **LONG))
        try:
            next(running)  # occupies the only replica slot
            queued = router.infer_stream.remote(chat("medium", **LONG))  # fills the one queue place
            response = httpx.post(f"{base_url}/v1/chat/completions", json=chat("medium", max_tokens=5), timeout=10)
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "overloaded"
            queued.cancel()
        finally:
            running.cancel()
