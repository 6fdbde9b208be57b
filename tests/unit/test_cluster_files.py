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
    assert types["cpu_worker"]["resources"] == {"CPU": 16, "cpu_node": 1}
    assert types["gpu_worker"]["resources"]["GPU"] == 1 and types["gpu_x4_worker"]["resources"]["GPU"] == 4
    assert all(types[t]["min_workers"] == 0 < types[t]["max_workers"] for t in ("gpu_worker", "gpu_x4_worker"))
    assert config["max_workers"] == sum(t["max_workers"] for t in types.values())
    check, deploy = config["head_start_ray_commands"][-2:]  # the layout is checked against these node types first
    assert check.endswith("deployments.config cluster/serve_config.gpu.yaml --cluster cluster/ray-cluster.yaml")
    assert deploy.endswith("serve deploy cluster/serve_config.gpu.yaml")
    assert any("make install models" in c for c in config["setup_commands"])


def test_the_rayservice_embeds_the_cluster_serve_config_verbatim() -> None:
    manifest = load(CLUSTER / "rayservice.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    for group, gpus in (("gpu-workers", "1"), ("gpu-x4-workers", "4")):
        assert groups[group]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert groups[group]["minReplicas"] < groups[group]["maxReplicas"]
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == load(CLUSTER / "serve_config.gpu.yaml")


def _strict(schema: Any) -> Any:
    """A CRD schema as `kubectl apply --validate=strict` reads it: unknown fields are errors."""
    if isinstance(schema, dict):
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        for value in schema.values():
            _strict(value)
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema


def test_the_rayservice_validates_against_kuberays_crd() -> None:
    """``data/kuberay-rayservice-v1.schema.json.gz``: the ``v1`` openAPIV3Schema of KubeRay's
    ``ray.io_rayservices.yaml`` (ray-project/kuberay feeaf72, v1.7.0-rc.0+5)."""
    import gzip
    import json

    import jsonschema

    schema = _strict(
        json.loads(gzip.decompress((ROOT / "tests/unit/data/kuberay-rayservice-v1.schema.json.gz").read_bytes()))
    )
    manifest = load(CLUSTER / "rayservice.yaml")
    jsonschema.Draft7Validator(schema).validate(manifest)
    manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1  # a typo fails
    with pytest.raises(jsonschema.ValidationError, match="'minReplica' was unexpected"):
        jsonschema.Draft7Validator(schema).validate(manifest)


@pytest.mark.parametrize("path", ["serve_config.yaml", "cluster/serve_config.gpu.yaml"])
def test_every_serve_config_passes_rays_schema_and_ours(path: str) -> None:
    apps = validate_serve_config(ROOT / path)  # ServeDeploySchema, then AppConfig
    assert list(apps) == ["nika"]


@pytest.mark.parametrize("cluster", ["ray-cluster.yaml", "rayservice.yaml"])
def test_the_cluster_node_types_hold_a_replica_of_every_model(cluster: str) -> None:
    if cluster == "rayservice.yaml":  # the manifest carries its own serve config
        apps = validate_serve_config(CLUSTER / cluster)
    else:
        apps = validate_serve_config(CLUSTER / "serve_config.gpu.yaml", cluster=CLUSTER / cluster)
    assert "tiny-vision-tp2" in [m.name for m in apps["nika"].models]


def test_a_layout_the_cluster_cannot_hold_fails_the_check(tmp_path: Path) -> None:
    from deployments.placement import LayoutError

    ray_up = load(CLUSTER / "ray-cluster.yaml")
    del ray_up["available_node_types"]["gpu_x4_worker"]
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(ray_up))
    with pytest.raises(LayoutError, match="model tiny-vision-tp2: needs 2 GPUs on one node"):
        validate_serve_config(CLUSTER / "serve_config.gpu.yaml", cluster=tmp_path / "cluster.yaml")


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
    """The cluster serves every local model the same way; it may add models (one split over GPUs)."""
    local, cluster = _must_match(load(ROOT / "serve_config.yaml")), _must_match(load(CLUSTER / "serve_config.gpu.yaml"))
    assert cluster["models"][: len(local["models"])] == local["models"]
    assert cluster | {"models": local["models"]} == local


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
    assert len(starts) == 2 and len(containers) == 4
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
    models = {name: app._bound_deployment for name, app in router.init_args[1].items()}
    assert models["tiny-embed"].ray_actor_options["resources"] == {"cpu_node": 0.01}
    # GGUF: a replica per GPU, every layer offloaded.
    assert models["tiny-llama"].ray_actor_options["num_gpus"] == 1 and config.model("tiny-llama").gpu_layers == -1
    # Vision: two replicas to a GPU, each vLLM taking its share of the memory; GPU rules apply.
    vision = config.model("tiny-vision")
    assert models["tiny-vision"].ray_actor_options["num_gpus"] == 0.5
    assert (vision.platform, vision.gpu_memory_utilization) == ("cuda", 0.45)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in models["tiny-vision"].ray_actor_options["runtime_env"]["env_vars"]
    # Tensor parallelism 2: the replica and its two GPU workers in one group on one node.
    tp2 = models["tiny-vision-tp2"]
    assert tp2.ray_actor_options["num_gpus"] == 0
    assert tp2._replica_config.placement_group_bundles == [{"CPU": 3.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]
    assert tp2._replica_config.placement_group_strategy == "STRICT_PACK"
    # The batch runner: on the head, whose disk (or the RayService's volume) keeps the batches' state.
    runner = router.init_args[2]._bound_deployment
    assert runner.ray_actor_options["resources"] == {"batch_store": 0.01} and runner.num_replicas == 1
    assert load(CLUSTER / "ray-cluster.yaml")["available_node_types"]["head"]["resources"]["batch_store"] == 1
    head = load(CLUSTER / "rayservice.yaml")["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert "batch_store" in head["rayStartParams"]["resources"]
    assert head["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] == "/app/.batches"


def test_the_cluster_schema_check_catches_a_typo() -> None:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(CLUSTER / "ray-cluster.yaml") | {"setup_comands": ["make install"]}
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(config))
