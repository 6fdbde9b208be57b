"""A model split over workers (tensor parallelism 2) through the real Serve app, on vLLM's CPU build.

vLLM's CPU platform has no Ray executor (``CpuPlatform.ray_device_key`` is empty, and
``initialize_ray_cluster`` refuses such a platform), so on CPU the two workers are processes of
the replica (vLLM's multiprocessing executor, shared memory between them) and the replica's
placement group reserves their CPUs on its node. On GPUs the same config gives Ray's executor,
which starts the workers in that group (tested by configuration: ``tests/unit/test_placement.py``).
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import psutil
import pytest
import ray
from ray import serve

from deployments.config import AppConfig
from deployments.lifecycle import set_model_loaded
from deployments.replica import deployment_name
from tests.e2e.conftest import ServeApp, poll
from tests.e2e.test_vision import data_url, greedy, png, vision_messages

pytestmark = pytest.mark.e2e

APP = "parallel"
MODEL = "vision-tp2"


@pytest.fixture(scope="module")
def parallel(app: ServeApp) -> Iterator[openai.OpenAI]:
    config = AppConfig.model_validate(
        {
            "router": {"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}},
            "models": [
                {
                    "name": MODEL,
                    "kind": "vision",
                    "path": str(app.models_dir / "tiny-idefics3"),
                    "context_size": 32768,
                    "kv_cache_bytes": 80 * 2**20,
                    "tensor_parallel_size": 2,
                    "worker_cpus": 1,
                    "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
                }
            ],
        }
    )
    with app.side_app(APP, config) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def where() -> dict:
    return serve.get_deployment_handle(deployment_name(MODEL), APP).placement.remote().result(timeout_s=60)


def test_the_replica_and_its_two_workers_run_in_its_placement_group(app: ServeApp, parallel: openai.OpenAI) -> None:
    placed = where()
    # The replica actor (0.5 CPU) shares bundle 0 with worker 0; worker 1 has its own.
    assert placed["bundles"] == [{"CPU": 1.5}, {"CPU": 1.0}]
    group = ray.util.placement_group_table()[placed["placement_group"]]
    assert (group["strategy"], group["state"]) == ("STRICT_PACK", "CREATED")
    workers = placed["workers"]
    assert sorted((w["rank"], w["tensor_rank"], w["pipeline_rank"]) for w in workers) == [(0, 0, 0), (1, 1, 0)]
    # The workers are processes of the replica, on its node: what the group reserved is theirs.
    descendants = {child.pid for child in psutil.Process(placed["pid"]).children(recursive=True)}
    assert {w["pid"] for w in workers} <= descendants
    layout = app.model_card(MODEL, APP)["layout"]
    assert layout | {"gpus": 0.0} == {
        "gpus": 0.0,
        "tensor_parallel_size": 2,
        "pipeline_parallel_size": 1,
        "placement_strategy": "STRICT_PACK",
        "gpu_memory_utilization": None,
    }


def test_split_over_two_workers_it_computes_what_one_worker_does(app: ServeApp, parallel: openai.OpenAI) -> None:
    image = data_url(png("teal"))
    assert greedy(parallel, image, model=MODEL) == greedy(app.openai, image, model="vision")


def test_streams_and_a_closed_stream_stops_both_workers(app: ServeApp, parallel: openai.OpenAI) -> None:
    stream = parallel.chat.completions.create(
        model=MODEL,
        messages=vision_messages(data_url(png("navy"))),
        stream=True,
        max_tokens=20000,
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    assert app.active_generations(MODEL, APP) == 1
    stream.close()
    poll(lambda: app.active_generations(MODEL, APP) == 0, 10, "vLLM to drop the cancelled request")
    done = parallel.chat.completions.create(model=MODEL, messages=vision_messages(), max_tokens=4)
    assert done.choices[0].finish_reason in ("length", "stop") and done.usage.completion_tokens >= 1


def test_unload_stops_the_workers_and_load_starts_new_ones_in_the_same_group(parallel: openai.OpenAI) -> None:
    before = where()
    set_model_loaded(MODEL, False, app_name=APP)
    try:
        poll(lambda: not any(psutil.pid_exists(w["pid"]) for w in before["workers"]), 60, "the workers to exit")
    finally:
        set_model_loaded(MODEL, True, app_name=APP)
    after = where()
    assert after["placement_group"] == before["placement_group"] and len(after["workers"]) == 2
    assert {w["pid"] for w in after["workers"]}.isdisjoint(w["pid"] for w in before["workers"])
    reply = parallel.chat.completions.create(model=MODEL, messages=vision_messages(data_url(png("red"))), max_tokens=4)
    assert reply.usage.completion_tokens >= 1
