"""Layouts: what a model's config asks Serve and vLLM/llama.cpp for, for 1-8 GPUs, fractions and
CPU workers, and the layouts refused at config time with what to change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from deployments.config import AppConfig, GGUFModelConfig, VisionModelConfig, layout_problems
from deployments.engines.gguf import llama_model_params
from deployments.engines.vision import VLLMEngine
from deployments.placement import NodeType, Placement, node_types_of_rayservice
from deployments.replica import model_deployment_options

CACHE = Path("/tmp/nika-test-cache")


def vision(models_dir: Path, actor: dict[str, Any] | None = None, **fields: Any) -> VisionModelConfig:
    return VisionModelConfig(
        name="v",
        path=models_dir / "tiny-idefics3",
        deployment={"ray_actor_options": {"num_cpus": 2} | (actor or {})},
        **fields,
    )


def gguf(models_dir: Path, actor: dict[str, Any] | None = None, **fields: Any) -> GGUFModelConfig:
    return GGUFModelConfig(
        name="g",
        path=models_dir / "tiny-llama-Q4_K_M.gguf",
        deployment={"ray_actor_options": {"num_cpus": 2} | (actor or {})},
        **fields,
    )


def refusal(make: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ValidationError) as info:
        make(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (4, 1), (8, 1), (1, 2), (2, 2), (1, 4), (4, 2)])
def test_a_parallel_gpu_replica_reserves_one_gpu_bundle_per_worker(models_dir: Path, tp: int, pp: int) -> None:
    """The demo VLM has 2 heads and 2 layers: larger splits are refused naming that limit (the
    bundles of 1-8 GPUs: the next test)."""
    workers = tp * pp
    if tp > 2 or pp > 2:  # beyond the demo model's 2 heads / 2 layers: refused, naming the model's limit
        text = refusal(vision, models_dir, {"num_gpus": workers}, tensor_parallel_size=tp, pipeline_parallel_size=pp)
        assert "attention heads" in text or "layers" in text
        return
    config = vision(models_dir, {"num_gpus": workers}, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    options = model_deployment_options(config, CACHE)
    assert options["ray_actor_options"]["num_gpus"] == 0  # the workers hold the GPUs, not the replica actor
    assert options["ray_actor_options"]["num_cpus"] == 2
    assert options["placement_group_bundles"] == [{"CPU": 3.0, "GPU": 1.0}] + [{"CPU": 1.0, "GPU": 1.0}] * (workers - 1)
    assert options["placement_group_strategy"] == ("STRICT_PACK" if pp == 1 else "PACK")
    kwargs = VLLMEngine(config).engine_kwargs()
    assert (kwargs["tensor_parallel_size"], kwargs["pipeline_parallel_size"]) == (tp, pp)
    assert kwargs["distributed_executor_backend"] == "ray"
    assert kwargs["gpu_memory_utilization"] == 0.9
    assert config.layout == {
        "gpus": float(workers),
        "tensor_parallel_size": tp,
        "pipeline_parallel_size": pp,
        "placement_strategy": options["placement_group_strategy"],
        "gpu_memory_utilization": 0.9,
    }


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_any_gpu_count_splits_a_model_with_enough_heads(gpus: int) -> None:
    """The bundles for 1-8 GPUs, without a checkpoint: the placement rule alone."""
    from deployments.placement import worker_group

    placement = worker_group(
        {"num_cpus": 4, "num_gpus": gpus, "accelerator_type": "H100", "resources": {"gpu_pool": 0.01}},
        gpus,
        {"CPU": 1.0, "GPU": 1.0, "accelerator_type:H100": 0.001},
        "STRICT_PACK",
    )
    assert placement.actor_options == {"num_cpus": 4, "num_gpus": 0, "resources": {"gpu_pool": 0.01}}
    first, *rest = placement.bundles or []
    assert first == {"CPU": 5.0, "GPU": 1.0, "accelerator_type:H100": 0.001, "gpu_pool": 0.01}
    assert rest == [{"CPU": 1.0, "GPU": 1.0, "accelerator_type:H100": 0.001}] * (gpus - 1)
    node = NodeType("p5", {"CPU": 192, "GPU": 8, "accelerator_type:H100": 1, "gpu_pool": 1})
    assert layout_problems_of_placement(placement, [node], gpus) == []
    half = NodeType("half", {"CPU": 192, "GPU": 4, "accelerator_type:H100": 1, "gpu_pool": 1})
    assert bool(layout_problems_of_placement(placement, [half], gpus)) == (gpus > 4)


def layout_problems_of_placement(placement: Placement, nodes: list[NodeType], gpus: int) -> list[str]:
    from deployments.placement import layout_problems

    return layout_problems("m", placement, nodes, same_node_gpus=gpus)


def test_a_parallel_cpu_replica_reserves_its_worker_processes_cpus(models_dir: Path) -> None:
    config = vision(models_dir, {"num_cpus": 0.5}, tensor_parallel_size=2, worker_cpus=2)
    options = model_deployment_options(config, CACHE)
    assert options["placement_group_bundles"] == [{"CPU": 2.5}, {"CPU": 2.0}]
    assert options["placement_group_strategy"] == "STRICT_PACK"
    stages = model_deployment_options(vision(models_dir, pipeline_parallel_size=2), CACHE)
    assert stages["placement_group_strategy"] == "STRICT_PACK"  # on CPU even pipeline stages share the node
    kwargs = VLLMEngine(config).engine_kwargs()
    assert kwargs["distributed_executor_backend"] == "mp" and "gpu_memory_utilization" not in kwargs
    assert options["ray_actor_options"]["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "2"  # each worker's


def test_a_single_worker_replica_is_one_actor_without_a_group(models_dir: Path) -> None:
    for actor in ({}, {"num_gpus": 1}, {"num_gpus": 0.25}):
        options = model_deployment_options(vision(models_dir, actor), CACHE)
        assert "placement_group_bundles" not in options
        assert options["ray_actor_options"].get("num_gpus") == actor.get("num_gpus")
        assert "distributed_executor_backend" not in VLLMEngine(vision(models_dir, actor)).engine_kwargs()


@pytest.mark.parametrize(("gpus", "default"), [(0.5, 0.45), (0.25, 0.225), (0.1, 0.09)])
def test_a_shared_gpu_gets_its_share_of_memory(models_dir: Path, gpus: float, default: float) -> None:
    assert vision(models_dir, {"num_gpus": 1}).gpu_memory_utilization == 0.9  # vLLM's default, a whole GPU
    assert vision(models_dir, {"num_gpus": gpus}).gpu_memory_utilization == default
    assert vision(models_dir, {"num_gpus": gpus}, gpu_memory_utilization=gpus).gpu_memory_utilization == gpus
    text = refusal(vision, models_dir, {"num_gpus": gpus}, gpu_memory_utilization=gpus + 0.05)
    assert f"exceeds the replica's share of its GPU ({gpus:g}" in text and "lower it" in text


def test_replicas_packed_on_one_gpu_never_ask_for_more_than_its_memory(models_dir: Path) -> None:
    """Whatever Ray packs on a GPU has fractions summing to at most 1; each replica's memory share
    is at most its fraction, so their memory sums to at most 1 too."""
    fractions = [0.5, 0.25, 0.125, 0.125]
    shares = [vision(models_dir, {"num_gpus": f}).gpu_memory_utilization or 0 for f in fractions]
    assert sum(fractions) == 1 and sum(shares) <= 1


@pytest.mark.parametrize(
    ("actor", "fields", "message"),
    [
        ({"num_gpus": 1}, {"tensor_parallel_size": 2}, "set ray_actor_options.num_gpus to 2"),
        ({"num_gpus": 4}, {"tensor_parallel_size": 2}, "set ray_actor_options.num_gpus to 2"),
        ({"num_gpus": 2}, {}, "one vLLM worker uses one GPU"),
        ({"num_gpus": 1.5}, {}, "one vLLM worker uses one GPU"),
        ({}, {"tensor_parallel_size": 4}, "must divide the model's 2 attention heads"),
        ({}, {"pipeline_parallel_size": 3}, "exceeds the 2 layers"),
        ({}, {"tensor_parallel_size": 2, "placement_strategy": "PACK"}, "on CPU, vLLM's workers are processes"),
        ({"num_gpus": 2}, {"tensor_parallel_size": 2, "placement_strategy": "SPREAD"}, "tensor-parallel ranks"),
        ({}, {"placement_strategy": "STRICT_PACK"}, "this one has a single worker"),
        ({}, {"gpu_memory_utilization": 0.5}, "on CPU, kv_cache_bytes sizes the KV cache"),
        ({"num_gpus": 1, "accelerator_type": "T4"}, {"isq": "FP8"}, "needs compute capability >= 8.9; T4"),
        ({"num_gpus": 1, "accelerator_type": "A100"}, {"isq": "fp8_per_channel"}, "A100 GPUs have 8.0"),
    ],
)
def test_impossible_vision_layouts_say_what_to_change(
    models_dir: Path, actor: dict[str, Any], fields: dict[str, Any], message: str
) -> None:
    assert message in refusal(vision, models_dir, actor, **fields)


def test_pipeline_stages_may_spread_over_nodes(models_dir: Path) -> None:
    config = vision(models_dir, {"num_gpus": 2}, pipeline_parallel_size=2, placement_strategy="SPREAD")
    assert model_deployment_options(config, CACHE)["placement_group_strategy"] == "SPREAD"
    assert vision(models_dir, {"num_gpus": 1, "accelerator_type": "H100"}, isq="FP8").isq == "FP8"


def test_gguf_on_gpus_offloads_every_layer_and_splits_over_the_replicas_gpus(models_dir: Path) -> None:
    import llama_cpp

    assert (gguf(models_dir).gpu_layers, gguf(models_dir).split_mode) == (0, "none")
    one = gguf(models_dir, {"num_gpus": 1})
    assert (one.gpu_layers, one.split_mode, one.layout["gpus"]) == (-1, "none", 1.0)
    shared = gguf(models_dir, {"num_gpus": 0.5})
    assert (shared.gpu_layers, shared.split_mode) == (-1, "none")
    four = gguf(models_dir, {"num_gpus": 4}, tensor_split=[3, 1, 1, 1], main_gpu=2)
    assert four.split_mode == "layer"
    params = llama_model_params(llama_cpp, four)
    assert (params.n_gpu_layers, params.split_mode, params.main_gpu) == (0x7FFFFFFF, 1, 2)
    assert [params.tensor_split[i] for i in range(5)] == [3.0, 1.0, 1.0, 1.0, 0.0]
    row = llama_model_params(llama_cpp, gguf(models_dir, {"num_gpus": 2}, split_mode="row", gpu_layers=10))
    assert (row.n_gpu_layers, row.split_mode, bool(row.tensor_split)) == (10, 2, False)
    # A laptop's Metal GPU is not a Ray resource: gpu_layers may still be set without num_gpus.
    assert llama_model_params(llama_cpp, gguf(models_dir, gpu_layers=-1)).split_mode == 0
    assert model_deployment_options(four, CACHE)["ray_actor_options"]["num_gpus"] == 4  # one process, 4 GPUs


@pytest.mark.parametrize(
    ("actor", "fields", "message"),
    [
        ({}, {"split_mode": "layer"}, "but the replica reserves none"),
        ({}, {"tensor_split": [1, 1]}, "one per GPU of the replica"),
        ({"num_gpus": 2}, {"split_mode": "none"}, "leaves all but main_gpu idle"),
        ({"num_gpus": 2}, {"tensor_split": [1, 1, 1]}, "gives 3 shares"),
        ({"num_gpus": 2}, {"main_gpu": 2}, "main_gpu=2 is not one of the replica's GPUs (0..1)"),
        ({"num_gpus": 1.5}, {}, "a replica spans whole GPUs"),
    ],
)
def test_impossible_gguf_layouts_say_what_to_change(
    models_dir: Path, actor: dict[str, Any], fields: dict[str, Any], message: str
) -> None:
    assert message in refusal(gguf, models_dir, actor, **fields)


def app(models_dir: Path, *models: VisionModelConfig | GGUFModelConfig) -> AppConfig:
    return AppConfig(models=[m.model_dump() for m in models])


NODES = [
    NodeType("cpu", {"CPU": 16, "cpu_node": 1}),
    NodeType("l4", {"CPU": 8, "GPU": 1, "accelerator_type:L4": 1}),
    NodeType("t4x4", {"CPU": 48, "GPU": 4, "accelerator_type:T4": 1}),
]


def test_the_cluster_check_names_each_model_it_cannot_place(models_dir: Path) -> None:
    ok = app(models_dir, vision(models_dir, {"num_gpus": 0.5}), gguf(models_dir, {"num_gpus": 1}))
    assert layout_problems(ok, NODES) == []
    tp = app(models_dir, vision(models_dir, {"num_gpus": 2}, tensor_parallel_size=2))
    assert layout_problems(tp, NODES) == []  # the T4 node has 4 GPUs
    without_x4 = NODES[:2]
    (first, *_) = layout_problems(tp, without_x4)
    assert "needs 2 GPUs on one node, but the largest node type (l4) has 1" in first
    fp8 = app(models_dir, vision(models_dir, {"num_gpus": 2}, tensor_parallel_size=2, isq="FP8"))
    (problem,) = layout_problems(fp8, NODES)
    assert "on node type t4x4: isq fp8 needs compute capability >= 8.9; T4 GPUs have 7.5" in problem
    big = app(models_dir, gguf(models_dir, {"num_cpus": 64}))
    (problem,) = layout_problems(big, NODES)
    assert "no node type offers {CPU: 64}" in problem
    pinned = app(models_dir, gguf(models_dir, {"resources": {"cpu_node": 0.01}, "num_gpus": 1}))
    assert "no node type offers" in layout_problems(pinned, NODES)[0]  # no node has both


def test_rayservice_groups_read_as_kuberay_starts_ray() -> None:
    group = {
        "rayStartParams": {"resources": '"{\\"cpu_node\\": 1}"'},
        "template": {"spec": {"containers": [{"resources": {"limits": {"cpu": "1500m"}}}]}},
    }
    gpu = {
        "groupName": "gpu",
        "rayStartParams": {"num-cpus": "6"},
        "template": {"spec": {"containers": [{"resources": {"limits": {"cpu": "8", "nvidia.com/gpu": "2"}}}]}},
    }
    manifest = {"spec": {"rayClusterConfig": {"headGroupSpec": group, "workerGroupSpecs": [gpu]}}}
    head, worker = node_types_of_rayservice(manifest)
    assert head.resources == {"CPU": 1.5, "GPU": 0.0, "cpu_node": 1.0}
    assert (worker.name, worker.resources) == ("gpu", {"CPU": 6.0, "GPU": 2.0})
