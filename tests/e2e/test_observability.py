"""The request id travels end to end: response header, router log, model replica log."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from tests.e2e.conftest import ServeApp, chat, poll

pytestmark = pytest.mark.e2e


def serve_logs() -> dict[str, str]:
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return {path.name: path.read_text(errors="replace") for path in logs.glob("replica_nika_*.log")}


def test_the_request_id_is_echoed_and_logged_by_router_and_replica(app: ServeApp) -> None:
    response = app.http.post("/v1/chat/completions", json=chat(max_tokens=3))
    request_id = response.headers["x-request-id"]
    assert response.json()["id"] == f"chatcmpl-{request_id}"

    def logged_by(prefix: str) -> bool:
        return any(request_id in text for name, text in serve_logs().items() if name.startswith(prefix))

    poll(lambda: logged_by("replica_nika_Router_"), 10, "the router to log the request id")
    poll(lambda: logged_by("replica_nika_model-tiny_"), 10, "the model replica to log the request id")
