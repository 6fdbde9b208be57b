"""The router's own rules (no Ray)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from ray.serve.exceptions import BackPressureError

from deployments import router
from deployments.errors import InvalidRequest


@pytest.mark.parametrize(("host", "warned"), [("127.0.0.1", False), ("localhost", False), ("::1", False),
                                              ("0.0.0.0", True), ("10.0.0.5", True), ("my-host", True)])  # fmt: skip
def test_serving_beyond_loopback_without_a_key_is_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, host: str, warned: bool
) -> None:
    client = SimpleNamespace(http_config=SimpleNamespace(host=host))
    monkeypatch.setattr("ray.serve.context._get_global_client", lambda: client)
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        router._warn_if_open()
    assert ("without an API key" in caplog.text) is warned


def raising(exc: Exception) -> Callable[[], Awaitable[None]]:
    async def endpoint() -> None:
        raise exc

    return endpoint


def test_expected_errors_are_answered_and_only_unexpected_ones_re_raised() -> None:
    """Starlette re-raises what its ``Exception`` handler answered; for a 4xx that made Serve log
    a failed request with a traceback. The test client raises whatever the app re-raises."""
    app = FastAPI()
    router.install_error_handlers(app)
    failures: dict[str, Exception] = {
        "bad": InvalidRequest("messages.0.content: fix this"),
        "busy": BackPressureError(num_queued_requests=4, max_queued_requests=4),
        "bug": KeyError("x"),
    }
    for name, exc in failures.items():
        app.add_api_route(f"/{name}", raising(exc))
    client = TestClient(app)
    bad = client.get("/bad")
    assert (bad.status_code, bad.json()["error"]["type"]) == (400, "invalid_request_error")
    assert "fix this" in bad.json()["error"]["message"]
    assert client.get("/busy").status_code == 503
    assert client.get("/nowhere").json()["error"]["code"] == "not_found"
    with pytest.raises(KeyError):
        client.get("/bug")
    bug = TestClient(app, raise_server_exceptions=False).get("/bug")
    assert bug.status_code == 500 and "request id" in bug.json()["error"]["message"]
