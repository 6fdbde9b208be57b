"""The application builder: ``serve_config.yaml``'s ``import_path`` is ``deployments.app:build_app``.

It validates the whole config first (a bad file, key or value fails ``serve run`` before
anything is deployed), then binds one model deployment per configured model, the batch runner
and the router.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from deployments.batch.runner import BatchRunner, runner_deployment_options
from deployments.config import AppConfig, ModelConfig
from deployments.engines import engine_for
from deployments.engines.base import Engine
from deployments.replica import ModelReplica, deployment_name, model_deployment_options
from deployments.router import Router, router_deployment_options

DEFAULT_APP_NAME = "nika"
IMPORT_PATH = "deployments.app:build_app"


EngineFactory = Callable[[ModelConfig], Engine]


def build_model(model: ModelConfig, cache_dir: Path, make_engine: EngineFactory = engine_for) -> Application:
    deployment = serve.deployment(ModelReplica).options(
        name=deployment_name(model.name), **model_deployment_options(model, cache_dir)
    )
    return deployment.bind(model.model_dump(mode="json"), make_engine)


def build_app(args: dict[str, Any] | AppConfig) -> Application:
    """The application of a config (Serve's builder signature: one argument)."""
    return bind_app(args if isinstance(args, AppConfig) else AppConfig.model_validate(args))


def bind_app(config: AppConfig, make_engine: EngineFactory = engine_for) -> Application:
    """The application of a validated config; ``make_engine`` replaces the real engines (tests inject a fake)."""
    models = {model.name: build_model(model, config.cache_dir, make_engine) for model in config.models}
    args = config.model_dump(mode="json")
    batches = serve.deployment(BatchRunner).options(**runner_deployment_options(config)).bind(args, models)
    router = Router.options(**router_deployment_options(config.router))
    return router.bind(args, models, batches)
