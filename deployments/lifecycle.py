"""Load and unload a model on every replica of a running application, in place.

The mechanism is Serve's own: a ``user_config`` override on the model's deployment in the
application's declarative config. Serve applies it by calling ``reconfigure`` on every
replica (and passes it to replicas started later) without restarting them, whereas
changing the app's ``args`` would rebuild and replace every replica. Editing the same
override in ``serve_config.yaml`` and running ``serve deploy`` does exactly what this does::

    deployments:
      - name: model-tiny-llama
        user_config: {loaded: false}

CLI: ``python -m deployments.lifecycle {load,unload} MODEL [--app nika]``.
"""

from __future__ import annotations

import argparse
import time

from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

from deployments.app import DEFAULT_APP_NAME
from deployments.engines.base import ModelStatus
from deployments.errors import ModelNotFound
from deployments.replica import deployment_name


def set_model_loaded(model: str, loaded: bool, *, app_name: str = DEFAULT_APP_NAME, timeout_s: float = 300) -> None:
    """Apply ``{"loaded": loaded}`` to ``model``'s replicas; return once every replica reports it.

    Raises:
        ModelNotFound: the app was not deployed from a config, or has no such model.
        TimeoutError: the replicas did not all reach the state within ``timeout_s``.
    """
    client = _get_global_client()
    details = client.get_serve_details()
    deployed = {
        name: ServeApplicationSchema.model_validate(app["deployed_app_config"])
        for name, app in details["applications"].items()
        if app.get("deployed_app_config") is not None
    }
    if app_name not in deployed:
        raise ModelNotFound(f"no application {app_name!r} deployed from a config (serve run/deploy)")
    config = deployed[app_name]
    names = [m["name"] for m in config.args.get("models", [])]
    if model not in names:
        raise ModelNotFound(f"model {model!r} not found in app {app_name!r}; available models: {', '.join(names)}")

    target = deployment_name(model)
    user_config = {"loaded": loaded}
    overrides = [d for d in config.deployments if d.name != target]
    current = next((d for d in config.deployments if d.name == target), DeploymentSchema(name=target))
    overrides.append(current.model_copy(update={"user_config": user_config}))
    deployed[app_name] = config.model_copy(update={"deployments": overrides})
    # A declarative deploy is the whole cluster's config: carry every app along unchanged.
    client.deploy_apps(
        ServeDeploySchema(
            proxy_location=details["proxy_location"],
            http_options=details["http_options"],
            applications=list(deployed.values()),
        )
    )

    wanted = ModelStatus.LOADED if loaded else ModelStatus.UNLOADED
    handle = serve.get_deployment_handle(target, app_name)
    deadline = time.monotonic() + timeout_s
    statuses: set[ModelStatus] = set()
    while statuses != {wanted}:
        if time.monotonic() > deadline:
            raise TimeoutError(f"model {model} replicas are {sorted(s.value for s in statuses)}, not {wanted.value}")
        time.sleep(0.2)
        try:
            statuses = {info.status for info in handle.broadcast("info").results(timeout_s=10)}
        except (DeploymentUnavailableError, TimeoutError):  # the update is still rolling out
            statuses = set()


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description="Load or unload a model on every replica of a running app.")
    parser.add_argument("action", choices=["load", "unload"])
    parser.add_argument("model", help="the API model id, as in /v1/models")
    parser.add_argument("--app", default=DEFAULT_APP_NAME, help=f"Serve application name (default {DEFAULT_APP_NAME})")
    args = parser.parse_args()
    ray.init(address="auto", logging_level="WARNING")
    set_model_loaded(args.model, args.action == "load", app_name=args.app)
    print(f"model {args.model} {args.action}ed on every replica")


if __name__ == "__main__":
    main()
