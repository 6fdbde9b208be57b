"""cluster/ stays deployable: Ray's schemas, our schema, and no drift from serve_config.yaml."""

from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.app import build_app
from deployments.config import AppConfig, validate_serve_config
from deployments.constants import CLUSTER_ENV, LOCAL_ENV

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@pytest.fixture(autouse=True)
def from_repo_root(monkeypatch: pytest.MonkeyPatch, models_dir: Path) -> None:
    monkeypatch.chdir(ROOT)  # model paths in the configs are relative to the repository


def test_the_ray_up_file_validates_against_rays_cluster_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(CLUSTER / "ray-cluster.yaml")
    validate_config(prepare_config(config))  # what `ray up` does: provider defaults, then the schema
    types = config["available_node_types"]
    assert types["cpu_worker"]["resources"] == {"cpu_node": 1}
    assert "GPU" not in types["cpu_worker"]["resources"] and types["gpu_worker"]["max_workers"] > 0
    assert types["gpu_worker"]["min_workers"] == 0  # GPUs only while vision replicas need them
    assert any("serve deploy cluster/serve_config.gpu.yaml" in c for c in config["head_start_ray_commands"])
    assert any("make install models" in c for c in config["setup_commands"])


def test_the_rayservice_embeds_the_cluster_serve_config_verbatim() -> None:
    manifest = load(CLUSTER / "rayservice.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu_limits = groups["gpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "1"
    assert groups["gpu-workers"]["minReplicas"] < groups["gpu-workers"]["maxReplicas"]
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == load(CLUSTER / "serve_config.gpu.yaml")


@pytest.mark.parametrize("path", ["serve_config.yaml", "cluster/serve_config.gpu.yaml"])
def test_every_serve_config_passes_rays_schema_and_ours(path: str) -> None:
    apps = validate_serve_config(ROOT / path)  # ServeDeploySchema, then AppConfig
    assert list(apps) == ["nika"]


def _must_match(config: dict[str, Any]) -> dict[str, Any]:
    """What the cluster may not change: the API, the models and how they answer (a cluster adds a key)."""
    (app,) = config["applications"]
    args = app["args"]
    models = [
        {key: model.get(key) for key in ("name", "kind", "path", "context_size", "sampling", "gpu_layers")}
        | {"deadlines": model.get("deadlines", {}).get("default")}
        for model in args["models"]
    ]
    router = {key: value for key, value in args["router"].items() if key not in ("deployment", "api_key_env")}
    return {
        "app": (app["name"], app["route_prefix"], app["import_path"]),
        "port": config["http_options"]["port"],
        "router": router,
        "models": models,
    }


def test_the_cluster_config_does_not_drift_from_serve_config_yaml() -> None:
    assert _must_match(load(CLUSTER / "serve_config.gpu.yaml")) == _must_match(load(ROOT / "serve_config.yaml"))


def test_local_by_default_and_a_key_wherever_the_network_can_reach() -> None:
    assert load(ROOT / "serve_config.yaml")["http_options"]["host"] == "127.0.0.1"
    cluster = load(CLUSTER / "serve_config.gpu.yaml")
    (app,) = cluster["applications"]
    assert cluster["http_options"]["host"] == "0.0.0.0" and app["args"]["router"]["api_key_env"] == "NIKA_API_KEY"
    ray_up = load(CLUSTER / "ray-cluster.yaml")
    starts = [c for c in ray_up["head_start_ray_commands"] + ray_up["worker_start_ray_commands"] if "ray start" in c]
    assert all("NIKA_API_KEY=" in c for c in starts)
    groups = load(CLUSTER / "rayservice.yaml")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    router_group = next(g for g in groups if g["groupName"] == "cpu-workers")  # the router's resource: cpu_node
    env = router_group["template"]["spec"]["containers"][0]["env"]
    assert any(e["name"] == "NIKA_API_KEY" and "secretKeyRef" in e["valueFrom"] for e in env)


def test_every_place_that_starts_ray_sets_its_env() -> None:
    """Serve reads its environment when a node starts: LOCAL_ENV in the Makefile (local Ray of
    `serve run`, tests, benchmarks), CLUSTER_ENV and nothing of direct ingress in every `ray start`
    of the ray up file and every RayService container."""
    makefile = (ROOT / "Makefile").read_text()
    ray_up = load(CLUSTER / "ray-cluster.yaml")
    starts = [c for c in ray_up["head_start_ray_commands"] + ray_up["worker_start_ray_commands"] if "ray start" in c]
    spec = load(CLUSTER / "rayservice.yaml")["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    containers = [c for pod in pods for c in pod["template"]["spec"]["containers"]]
    assert len(starts) == 2 and len(containers) == 3
    for name, value in LOCAL_ENV.items():
        assert f"export {name} := {value}" in makefile
    for name, value in CLUSTER_ENV.items():
        assert all(f"export {name}={value};" in command for command in starts)
        assert all({"name": name, "value": value} in container.get("env", []) for container in containers)
    cluster_files = (CLUSTER / "ray-cluster.yaml").read_text() + (CLUSTER / "rayservice.yaml").read_text()
    assert "DIRECT_INGRESS" not in cluster_files


def test_resources_place_replicas_on_the_intended_nodes() -> None:
    (app,) = load(CLUSTER / "serve_config.gpu.yaml")["applications"]
    config = AppConfig.model_validate(app["args"])
    router = build_app(config)._bound_deployment
    assert router.ray_actor_options["resources"] == {"cpu_node": 0.01}
    models = router.init_args[1]
    gguf = models["tiny-llama"]._bound_deployment
    vision = models["tiny-vision"]._bound_deployment
    assert gguf.ray_actor_options["resources"] == {"cpu_node": 0.01} and "num_gpus" not in gguf.ray_actor_options
    assert gguf._replica_config.max_replicas_per_node == 4
    assert vision.ray_actor_options["num_gpus"] == 1
    assert config.model("tiny-vision").platform == "cuda"
    # GPU rules apply to the GPU deployment: block size 16 and isq FP8 -> vLLM's fp8.
    env = vision.ray_actor_options["runtime_env"]["env_vars"]
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env


def test_the_cluster_schema_check_catches_a_typo() -> None:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(CLUSTER / "ray-cluster.yaml") | {"setup_comands": ["make install"]}
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(config))
