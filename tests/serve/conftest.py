"""The Serve tier: the real router and replica deployments on Serve, with the fake engine.

Fast and deterministic (no model runs), so the contract is pinned here: outcomes, SSE framing,
error bodies, cancellation, deadlines, load states. Serve runs for this package only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from ray import serve

from deployments.app import bind_app
from deployments.config import AppConfig
from tests.conftest import RayCluster, batch_store, free_port, poll
from tests.fakes import FakeEngine, fake_gguf

APP = "fake"
SMALL = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}
MAX_FILE_BYTES = 2**20


def fake_config(gguf: Path, **models: dict[str, Any]) -> AppConfig:
    """The ``fake`` model plus ``models`` (name -> overrides), all on the fake GGUF file."""
    entries = {"fake": {}} | models
    return AppConfig.model_validate(
        {
            "router": {"deployment": SMALL},
            "batch": batch_store(gguf.parent / "batches") | {"max_file_bytes": MAX_FILE_BYTES, "deployment": SMALL},
            "models": [
                {"name": name, "kind": "gguf", "path": str(gguf), "deployment": SMALL} | overrides
                for name, overrides in entries.items()
            ],
        }
    )


@dataclass
class FakeApp:
    base_url: str
    http: httpx.Client
    gguf: Path

    @property
    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, timeout=30)

    def cards(self) -> dict[str, dict[str, Any]]:
        return {card["id"]: card for card in self.http.get("/v1/models").json()["data"]}

    def card(self, model: str = "fake") -> dict[str, Any]:
        return self.cards()[model]

    def counters(self, model: str = "fake") -> dict[str, int]:
        return serve.get_deployment_handle(f"model-{model}", APP).layer_types.remote().result(timeout_s=10)

    def redeploy(self, config: AppConfig, wait: bool = True) -> None:
        """Deploy ``config`` as the app; ``wait=False`` returns at once (for apps that may fail)."""
        app = bind_app(config, FakeEngine)
        serve._run(app, name=APP, route_prefix="/", _blocking=wait)  # serve.run's own, with the wait optional


@pytest.fixture(scope="package")
def fake_app(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeApp]:
    gguf = tmp_path_factory.mktemp("fake") / "fake-model-Q4_K_M.gguf"
    fake_gguf(str(gguf))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:  # even when the deploy fails: the next tier starts a Serve of its own
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            app = FakeApp(f"http://127.0.0.1:{port}", http, gguf)
            app.redeploy(fake_config(gguf))
            poll(lambda: http.get("/healthz").status_code == 200, 30, "the fake app")
            yield app
    finally:
        serve.shutdown()


@pytest.fixture
def client(fake_app: FakeApp) -> openai.OpenAI:
    return fake_app.openai
