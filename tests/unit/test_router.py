"""The router's own rules (no Ray)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from deployments import router


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
