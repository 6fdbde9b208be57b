"""Several nodes: replicas placed by resources, requests and streams served across nodes."""

from __future__ import annotations

import openai
import pytest
import ray
from ray.serve.context import _get_global_client

from deployments.config import AppConfig
from tests.e2e.conftest import ServeApp

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_replicas_land_where_their_resources_are_and_streams_cross_nodes(app: ServeApp) -> None:
    config = AppConfig.model_validate(
        {
            "router": {"deployment": {"ray_actor_options": {"num_cpus": 0.5, "resources": {"head_node": 0.01}}}},
            "models": [
                {
                    "name": "tiny",
                    "kind": "gguf",
                    "path": str(app.models_dir / "tiny-llama-Q4_K_M.gguf"),
                    "deployment": {"ray_actor_options": {"num_cpus": 0.5, "resources": {"cpu_node": 0.01}}},
                },
                {
                    "name": "vision",
                    "kind": "vision",
                    "path": str(app.models_dir / "tiny-idefics3"),
                    "kv_cache_bytes": 2**25,
                    "deployment": {"ray_actor_options": {"num_cpus": 0.5, "resources": {"gpu_node": 1}}},
                },
            ],
        }
    )
    side = "placed"
    with app.side_app(side, config) as base_url:
        deployments = _get_global_client().get_serve_details()["applications"][side]["deployments"]
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}

        def resources_of(deployment: str) -> list[dict[str, float]]:
            return [nodes[r["node_id"]] for r in deployments[deployment]["replicas"] if r["state"] == "RUNNING"]

        assert [("head_node" in r) for r in resources_of("Router")] == [True]
        assert [("gpu_node" in r) for r in resources_of("model-vision")] == [True]
        assert [("cpu_node" in r) for r in resources_of("model-tiny")] == [True]

        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        for model in ("tiny", "vision"):  # the router on the head, the model on a worker node
            chunks = list(
                client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=8,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True},
                )
            )
            assert chunks[-1].usage.completion_tokens == 8
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
