"""One real Ray Serve application for the whole session: real llama.cpp replicas, real HTTP."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import ray
from ray import serve

from ray.serve.context import _get_global_client
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from deployments.app import DEFAULT_APP_NAME, IMPORT_PATH
from deployments.config import AppConfig

APP_NAME = DEFAULT_APP_NAME


def e2e_config(models_dir: Path, tiny: dict[str, Any] | None = None, medium: dict[str, Any] | None = None) -> AppConfig:
    """Two models: ``tiny`` (milliseconds) and ``medium`` (~10 ms/token, for deadlines).

    ``tiny`` and ``medium`` override top-level keys of that model's entry.
    """
    one_cpu = {"num_replicas": 1, "max_ongoing_requests": 4, "ray_actor_options": {"num_cpus": 1}}
    return AppConfig.model_validate(
        {
            "router": {"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}},
            "models": [
                {"name": "tiny", "kind": "gguf", "path": str(models_dir / "tiny-llama-Q4_K_M.gguf"), "deployment": one_cpu}
                | (tiny or {}),
                {"name": "medium", "kind": "gguf", "path": str(models_dir / "medium-llama-Q4_K_M.gguf"), "deployment": one_cpu}
                | (medium or {}),
            ],
        }
    )


def poll(predicate: Callable[[], Any], timeout_s: float, what: str) -> float:
    """Wait until ``predicate()`` is truthy; return the seconds it took. Fails at the deadline."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - started


@dataclass
class ServeApp:
    base_url: str
    models_dir: Path
    http: httpx.Client
    http_options: dict[str, Any]

    @property
    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, timeout=60)

    def model_card(self, model: str) -> dict[str, Any]:
        cards = self.http.get("/v1/models").json()["data"]
        return next(card for card in cards if card["id"] == model)

    def active_generations(self, model: str) -> int:
        return self.model_card(model)["active_generations"]

    def deploy(self, config: AppConfig) -> None:
        """Deploy from a config, as ``serve run serve_config.yaml`` does (declarative API)."""
        app = ServeApplicationSchema(
            name=APP_NAME, route_prefix="/", import_path=IMPORT_PATH, args=config.model_dump(mode="json")
        )
        client = _get_global_client()
        client.deploy_apps(ServeDeploySchema(http_options=self.http_options, applications=[app]), _blocking=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def app(models_dir: Path) -> Iterator[ServeApp]:
    http_options = {"host": "127.0.0.1", "port": _free_port()}
    base_url = f"http://127.0.0.1:{http_options['port']}"
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    serve.start(http_options=http_options)
    with httpx.Client(base_url=base_url, timeout=60) as http:
        served = ServeApp(base_url, models_dir, http, http_options)
        served.deploy(e2e_config(models_dir))
        yield served
    serve.shutdown()
    ray.shutdown()


@pytest.fixture
def client(app: ServeApp) -> openai.OpenAI:
    return app.openai


def chat(model: str = "tiny", content: str = "hello", **extra: Any) -> dict[str, Any]:
    """A request body."""
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}
