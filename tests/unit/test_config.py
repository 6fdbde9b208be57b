"""Config errors fail at build time with the field's path, before anything is deployed."""

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from deployments.app import build_app
from deployments.config import AppConfig, local_problems, starting_demand, validate_serve_config

ROOT = Path(__file__).resolve().parents[2]


def model(models_dir: Path, **overrides: Any) -> dict[str, Any]:
    return {"name": "m", "kind": "gguf", "path": str(models_dir / "tiny-llama-Q4_K_M.gguf"), **overrides}


def error_text(args: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        build_app(args)
    return str(info.value)


def test_the_shipped_serve_config_validates(models_dir: Path) -> None:
    apps = validate_serve_config(ROOT / "serve_config.yaml")
    models = apps["nika"].models
    assert [(m.kind, m.serves_embeddings) for m in models] == [("gguf", False), ("gguf", True), ("vision", False)]
    # `make serve` starts a local Ray with the machine's CPUs: every replica (the batch runner's
    # too) must fit two of them, or one waits forever to be scheduled and the app is never ready.
    assert local_problems(apps, cpus=2) == []
    assert sum(d["CPU"] for d in starting_demand(apps["nika"]).values()) == 2


def test_a_config_a_local_ray_cannot_start_is_refused_naming_each_share(models_dir: Path) -> None:
    autoscaling = {"min_replicas": 0, "initial_replicas": 2, "max_replicas": 4}
    vision = {"kind": "vision", "name": "v", "path": str(models_dir / "tiny-idefics3"), "tensor_parallel_size": 2,
              "worker_cpus": 1, "deployment": {"autoscaling_config": autoscaling}}  # fmt: skip
    gguf = model(models_dir, deployment={"num_replicas": 3, "ray_actor_options": {"num_cpus": 0.5}})
    config = AppConfig.model_validate({"models": [gguf, vision]})
    demand = starting_demand(config)
    assert demand["model-m"]["CPU"] == 1.5  # 3 replicas of 0.5
    assert demand["model-v"]["CPU"] == 6  # 2 replicas at start, each its own CPU and two workers' (its group)
    assert demand["batch runner"] == {"CPU": 0.25} and demand["router"] == {"CPU": 0.5}
    (problem,) = local_problems({"app": config}, cpus=2)
    assert f"reserve {sum(d['CPU'] for d in demand.values()):g} CPUs" in problem
    assert "app/model-m 1.5" in problem and "app/batch runner 0.25" in problem and "lower" in problem
    assert local_problems({"app": config}, cpus=64) == []


def test_missing_model_file(models_dir: Path) -> None:
    text = error_text({"models": [model(models_dir, path="models/nope-Q4_0.gguf")]})
    assert "models.0.gguf.path" in text and "GGUF file not found" in text and "make models" in text


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"contxt_size": 10}, "models.0.gguf.contxt_size"),
        ({"context_size": 0}, "models.0.gguf.context_size"),
        ({"gpu_layers": -2}, "models.0.gguf.gpu_layers"),
        ({"kind": "onnx"}, "expected tags: 'gguf', 'vision'"),
        ({"sampling": {"temperature": 3}}, "models.0.gguf.sampling.temperature"),
        ({"deadlines": {"default": {"chunk_timeout_s": -1}}}, "models.0.gguf.deadlines.default.chunk_timeout_s"),
        ({"deadlines": {"default": {"chunk_timeout_s": 900}}}, "exceeds maximum.chunk_timeout_s"),
        ({"deployment": {"ray_actor_options": {"num_cpu": 1}}}, "unknown ray_actor_options ['num_cpu']"),
        ({"deployment": {"num_replicas": 2, "autoscaling_config": {"max_replicas": 2}}}, "not both"),
        ({"deployment": {"autoscaling_config": {"min_replicas": 3, "max_replicas": 1}}}, "autoscaling_config"),
        ({"name": "bad name with spaces"}, "models.0.gguf.name"),
    ],
)
def test_bad_values_name_their_field(models_dir: Path, overrides: dict[str, Any], field: str) -> None:
    assert field in error_text({"models": [model(models_dir, **overrides)]})


def test_duplicate_names_and_unknown_top_level_keys(models_dir: Path) -> None:
    assert "duplicate model names: ['m']" in error_text({"models": [model(models_dir), model(models_dir)]})
    assert "routr" in error_text({"models": [model(models_dir)], "routr": {}})


def test_the_config_cli_exits_non_zero_naming_the_field(models_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["applications"][0]["args"]["models"][0]["context_size"] = "big"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "deployments.config", str(bad)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 1
    assert "models.0.gguf.context_size" in result.stderr


def test_deployment_options_pass_through_to_serve(models_dir: Path) -> None:
    config = AppConfig.model_validate(
        {
            "models": [
                model(
                    models_dir,
                    deployment={
                        "autoscaling_config": {"min_replicas": 1, "max_replicas": 3},
                        "max_ongoing_requests": 2,
                        "max_queued_requests": 8,
                        "ray_actor_options": {"num_cpus": 1, "resources": {"cpu_node": 0.01}},
                    },
                )
            ]
        }
    )
    app = build_app(config)
    models = app._bound_deployment.init_args[1]
    deployment = models["m"]._bound_deployment
    assert deployment.name == "model-m"
    assert deployment.max_ongoing_requests == 2
    assert deployment._deployment_config.max_queued_requests == 8
    assert deployment._deployment_config.user_config == {"loaded": True}
    assert deployment.ray_actor_options["resources"] == {"cpu_node": 0.01}
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3


def test_partial_deployment_options_keep_each_deployments_own_defaults(models_dir: Path) -> None:
    app = build_app(
        {"models": [model(models_dir, deployment={"num_replicas": 2})], "router": {"deployment": {"num_replicas": 3}}}
    )
    router = app._bound_deployment
    assert router.num_replicas == 3
    assert router.max_ongoing_requests == 256
    assert router._deployment_config.max_queued_requests == 1024  # bounded: the proxy answers 503 past it
    assert router._deployment_config.backpressure_config.retry_after_s == 1
    replica = router.init_args[1]["m"]._bound_deployment
    assert replica.num_replicas == 2
    assert replica.max_ongoing_requests == 4
    assert replica._deployment_config.max_queued_requests == 64
    assert replica.ray_actor_options["num_cpus"] == 1


def vision(models_dir: Path, **overrides: Any) -> dict[str, Any]:
    return {"name": "v", "kind": "vision", "path": str(models_dir / "tiny-idefics3"), **overrides}


def test_vision_checkpoint_must_exist(models_dir: Path, tmp_path: Path) -> None:
    assert "no HF checkpoint (config.json)" in error_text({"models": [vision(models_dir, path=str(tmp_path))]})


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"block_size": 16}, "block_size=16 must be a multiple of 32 on cpu"),
        ({"isq": "Q4K"}, "isq 'Q4K' is not supported on cpu; supported: FP8, fp8_per_channel"),
        ({"isq": "int8_per_channel_weight_only"}, "not supported on cpu"),
        ({"isq": "FP8", "dtype": "float32"}, "isq needs dtype bfloat16 or float16"),
    ],
)
def test_vision_platform_rules_fail_at_build_time(models_dir: Path, overrides: dict[str, Any], fragment: str) -> None:
    assert fragment in error_text({"models": [vision(models_dir, **overrides)]})


def test_gpu_deployments_get_gpu_rules(models_dir: Path) -> None:
    on_gpu = {"deployment": {"ray_actor_options": {"num_gpus": 1}}}
    config = AppConfig.model_validate({"models": [vision(models_dir, block_size=16, isq="fp8", **on_gpu)]})
    assert config.models[0].platform == "cuda"
    assert "supported: FP8, fp8, fp8_per_tensor" in error_text({"models": [vision(models_dir, isq="Q4K", **on_gpu)]})


def test_vision_replicas_get_their_engine_environment(models_dir: Path) -> None:
    app = build_app({"models": [vision(models_dir, deployment={"ray_actor_options": {"num_cpus": 2}})]})
    replica = app._bound_deployment.init_args[1]["v"]._bound_deployment
    env = replica.ray_actor_options["runtime_env"]["env_vars"]
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and env["OMP_NUM_THREADS"] == "2"
    assert env["HF_HUB_OFFLINE"] == "1"
    for var in ("TMPDIR", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "VLLM_RPC_BASE_PATH"):
        assert Path(env[var]).is_absolute() and str(ROOT) in env[var]
    assert replica.max_ongoing_requests == 32  # vLLM batches


def test_router_and_vllm_replicas_stream_on_serve_data_path_and_config_env_wins(models_dir: Path) -> None:
    from deployments.constants import SERVE_DATA_PATH_ENV

    own = {"ray_actor_options": {"runtime_env": {"env_vars": {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1"}}}}
    gguf = {"name": "g", "kind": "gguf", "path": str(models_dir / "tiny-llama-Q4_K_M.gguf"), "deployment": own}
    router = build_app({"models": [gguf, vision(models_dir)]})._bound_deployment
    replicas = {name: app._bound_deployment for name, app in router.init_args[1].items()}
    for deployment in (router, replicas["v"]):
        assert deployment.ray_actor_options["runtime_env"]["env_vars"].items() >= SERVE_DATA_PATH_ENV.items()
    # llama.cpp replicas keep Serve's user-code thread; a config's own env_vars always win.
    assert replicas["g"].ray_actor_options["runtime_env"]["env_vars"] == {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1"}


@pytest.mark.parametrize(("parallel", "fragment"), [(0, "greater than 0"), (257, "exceeds llama.cpp's limit of 256")])
def test_parallel_is_bounded_by_llama_cpp_and_named(models_dir: Path, parallel: int, fragment: str) -> None:
    text = error_text({"models": [model(models_dir, parallel=parallel)]})
    assert "models.0.gguf.parallel" in text and fragment in text


def test_the_kv_pool_defaults_to_a_context_per_sequence_and_must_hold_one(models_dir: Path) -> None:
    config = AppConfig.model_validate({"models": [model(models_dir, parallel=4, context_size=1024)]})
    assert config.models[0].kv_cache_tokens == 4096
    assert "must hold one context" in error_text({"models": [model(models_dir, kv_cache_tokens=100)]})


def test_a_stream_per_sequence_unless_the_pool_is_smaller_than_every_context(models_dir: Path) -> None:
    def layout(**overrides: Any) -> bool | None:
        return AppConfig.model_validate({"models": [model(models_dir, **overrides)]}).models[0].kv_unified

    assert layout(parallel=4, context_size=1024) is False
    assert layout(parallel=4, context_size=1024, kv_cache_tokens=2048) is True  # oversubscribed: shared
    assert layout(parallel=4, context_size=1024, kv_unified=True) is True
    text = error_text(
        {"models": [model(models_dir, parallel=4, context_size=1024, kv_cache_tokens=2048, kv_unified=False)]}
    )
    assert "models.0.gguf" in text and "kv_cache_tokens=2048 must be at least 4096" in text


def test_serve_defaults_follow_parallel(models_dir: Path) -> None:
    autoscaled = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}
    app = build_app({"models": [model(models_dir, parallel=8, deployment=autoscaled)]})
    replica = app._bound_deployment.init_args[1]["m"]._bound_deployment
    assert replica.max_ongoing_requests == 8 + 3  # the batch, and a few for control calls and the next request
    assert replica._deployment_config.autoscaling_config.target_ongoing_requests == 8
    explicit = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3}}
    app = build_app({"models": [model(models_dir, parallel=8, deployment=explicit)]})
    replica = app._bound_deployment.init_args[1]["m"]._bound_deployment
    assert replica._deployment_config.autoscaling_config.target_ongoing_requests == 3
