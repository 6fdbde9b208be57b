"""One real Ray Serve application for the whole session: real llama.cpp replicas, real HTTP."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from deployments.app import DEFAULT_APP_NAME, IMPORT_PATH
from deployments.config import AppConfig
from deployments.direct_ingress import direct_urls
from tests.conftest import DIRECT_INGRESS_PORT, RayCluster, batch_store, free_port, poll

APP_NAME = DEFAULT_APP_NAME
DEPLOY_TIMEOUT_S = 600  # two vLLM engines and two llama.cpp models on 2 cores: ~170 s here, slower machines 2-3x


def e2e_config(
    models_dir: Path, tiny: dict[str, Any] | None = None, medium: dict[str, Any] | None = None, vision: bool = True
) -> AppConfig:
    """The test app: ``tiny`` (milliseconds per token), ``medium`` (~10 ms per token, for
    deadlines and cancellation), ``embed`` (embeddings), and, unless ``vision=False``, the demo
    VLM as ``vision`` and again with in-situ FP8 quantization as ``vision-fp8``.

    ``tiny`` and ``medium`` override top-level keys of that model's entry.
    """
    one_cpu = {"num_replicas": 1, "max_ongoing_requests": 4, "ray_actor_options": {"num_cpus": 1}}
    gguf = [
        {"name": "tiny", "kind": "gguf", "path": str(models_dir / "tiny-llama-Q4_K_M.gguf"), "deployment": one_cpu}
        | (tiny or {}),
        {"name": "medium", "kind": "gguf", "path": str(models_dir / "medium-llama-Q4_K_M.gguf"), "deployment": one_cpu}
        | (medium or {}),
        {"name": "embed", "kind": "gguf", "path": str(models_dir / "tiny-embed-Q8_0.gguf"), "embeddings": True,
         "context_size": 256, "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}},
    ]  # fmt: skip
    vlm = {
        "kind": "vision",
        "path": str(models_dir / "tiny-idefics3"),
        "context_size": 32768,  # ~30 s of generation for the cancellation and deadline tests
        "kv_cache_bytes": 80 * 2**20,  # 2 KiB per token (fp32, 2 layers x 2 KV heads x 64)
        "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}},
    }
    vlms = [{"name": "vision"} | vlm, {"name": "vision-fp8", "isq": "FP8"} | vlm] if vision else []
    return AppConfig.model_validate(
        {
            "router": {"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}},
            "batch": batch_store(Path(tempfile.mkdtemp(prefix="nika-batches-"))),
            "models": gguf + vlms,
        }
    )


def router_url(app: str) -> str:
    """The URL of app ``app``'s one router on its own port, in this session's Ray."""
    (url,) = direct_urls(app, first_port=DIRECT_INGRESS_PORT)
    return url


@dataclass
class ServeApp:
    """The session's Serve instance: the main app at ``/``, and side apps tests add for a while."""

    base_url: str
    models_dir: Path
    http: httpx.Client
    http_options: dict[str, Any]
    metrics_urls: list[str]
    apps: dict[str, AppConfig] = field(default_factory=dict)

    @property
    def direct_url(self) -> str:
        """The main app's router on its own port (Serve's direct ingress, ``constants.LOCAL_ENV``)."""
        return router_url(APP_NAME)

    @property
    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, timeout=60)

    def model_card(self, model: str, app: str = APP_NAME) -> dict[str, Any]:
        prefix = "" if app == APP_NAME else f"/{app}"
        cards = self.http.get(f"{prefix}/v1/models").json()["data"]
        return next(card for card in cards if card["id"] == model)

    def active_generations(self, model: str, app: str = APP_NAME) -> int:
        return self.model_card(model, app)["active_generations"]

    def _deploy(self, may_fail: frozenset[str] = frozenset()) -> None:
        """Deploy every app from a config, as ``serve run``/``serve deploy`` do (declarative API).

        A declarative deploy names the whole set of apps; an app whose config is unchanged
        keeps its replicas.
        """
        apps = [
            ServeApplicationSchema(
                name=name,
                route_prefix="/" if name == APP_NAME else f"/{name}",
                import_path=IMPORT_PATH,
                args=config.model_dump(mode="json"),
            )
            for name, config in self.apps.items()
        ]
        schema = ServeDeploySchema(proxy_location="HeadOnly", http_options=self.http_options, applications=apps)
        _get_global_client().deploy_apps(schema)
        poll(lambda: self._settled(may_fail), DEPLOY_TIMEOUT_S, f"apps {sorted(self.apps)} to run")

    def _settled(self, may_fail: frozenset[str]) -> bool:
        """True once every app runs (or, for ``may_fail``, has failed); a failure elsewhere fails at once."""
        statuses = serve.status().applications
        done = []
        for name in self.apps:
            status = statuses.get(name)
            if status is not None and status.status == "DEPLOY_FAILED" and name not in may_fail:
                raise AssertionError(f"app {name} failed to deploy: {status.message}")
            done.append(status is not None and status.status in ("RUNNING", "DEPLOY_FAILED"))
        return all(done) and not (set(statuses) - set(self.apps))

    @contextmanager
    def side_app(self, name: str, config: AppConfig, may_fail: bool = False) -> Iterator[str]:
        """Serve ``config`` as app ``name`` at ``/<name>`` for the block; yields its base URL."""
        self.apps[name] = config
        self._deploy(frozenset({name}) if may_fail else frozenset())
        try:
            yield f"{self.base_url}/{name}"
        finally:
            del self.apps[name]
            self._deploy()


@pytest.fixture(scope="session")
def app(ray_cluster: RayCluster, models_dir: Path) -> Iterator[ServeApp]:
    http_options = {"host": "127.0.0.1", "port": free_port()}
    base_url = f"http://127.0.0.1:{http_options['port']}"
    serve.start(proxy_location="HeadOnly", http_options=http_options)
    try:
        with httpx.Client(base_url=base_url, timeout=60) as http:
            served = ServeApp(
                base_url, models_dir, http, http_options, ray_cluster.metrics_urls, {APP_NAME: e2e_config(models_dir)}
            )
            served._deploy()
            yield served
    finally:
        serve.shutdown()


@pytest.fixture
def client(app: ServeApp) -> openai.OpenAI:
    return app.openai


@pytest.fixture(params=["proxy", "direct"])
def ingress_url(request: pytest.FixtureRequest, app: ServeApp) -> str:
    """The main app through Serve's HTTP proxy, and through its router's own port."""
    return app.base_url if request.param == "proxy" else app.direct_url


def chat(model: str = "tiny", content: str = "hello", **extra: Any) -> dict[str, Any]:
    """A request body."""
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}
