"""Scale: autoscaling under real load, determinism under concurrency, draining on shutdown."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from ray import serve

from tests.e2e.conftest import ServeApp, chat, e2e_config, poll

pytestmark = pytest.mark.e2e


def running_replicas(app: str, deployment: str) -> int:
    state = serve.status().applications[app].deployments[deployment]
    return state.replica_states.get("RUNNING", 0)


@pytest.mark.slow
def test_a_model_scales_up_under_load_and_back_down(app: ServeApp) -> None:
    autoscaling = {
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 1,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 1,
            "upscale_delay_s": 0,
            "downscale_delay_s": 2,
        },
        "max_ongoing_requests": 4,
        "ray_actor_options": {"num_cpus": 0.5},
    }
    side = "autoscaled"
    with app.side_app(side, e2e_config(app.models_dir, medium={"deployment": autoscaling}, vision=False)) as base_url:
        assert running_replicas(side, "model-medium") == 1
        router = serve.get_app_handle(side).options(stream=True)
        load = [router.infer_stream.remote(chat("medium", max_tokens=1500, ignore_eos=True)) for _ in range(4)]
        try:
            # One generates (whichever reached the engine first); the other three wait on the one
            # replica: 4 ongoing vs a target of 1.
            poll(lambda: app.active_generations("medium", app=side) >= 1, 60, "medium to start generating")
            poll(lambda: running_replicas(side, "model-medium") == 2, 60, "a second medium replica")
            # Both replicas serve.
            assert (
                httpx.post(f"{base_url}/v1/chat/completions", json=chat("medium", max_tokens=3), timeout=60).status_code
                == 200
            )
        finally:
            for stream in load:
                stream.cancel()
        poll(lambda: running_replicas(side, "model-medium") == 1, 60, "scaling back to one medium replica")


async def _stream_text(client: httpx.AsyncClient, request: dict) -> str:
    text = []
    async with client.stream("POST", "/v1/chat/completions", json=request) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line.removeprefix("data: "))
                assert "error" not in event, event
                for choice in event["choices"]:
                    text.append(choice["delta"].get("content", ""))
    return "".join(text)


def test_64_concurrent_streams_each_equal_their_solo_result(app: ServeApp) -> None:
    requests = [
        chat("tiny", content=f"story number {i}", stream=True, temperature=0, seed=7, max_tokens=24, ignore_eos=True)
        for i in range(64)
    ]

    async def run() -> tuple[list[str], list[str]]:
        async with httpx.AsyncClient(base_url=app.base_url, timeout=120) as client:
            solo = [await _stream_text(client, r) for r in requests]
            together = await asyncio.gather(*(_stream_text(client, r) for r in requests))
        return solo, list(together)

    solo, together = asyncio.run(run())
    assert all(solo) and len(set(solo)) > 32  # different prompts, different texts
    mismatched = {i: (solo[i], together[i]) for i in range(64) if solo[i] != together[i]}
    assert not mismatched, f"streams differ from their solo runs (lost, duplicated or crossed chunks): {mismatched}"


@pytest.mark.slow
def test_removing_an_app_drains_its_in_flight_streams(app: ServeApp) -> None:
    config = e2e_config(
        app.models_dir,
        medium={"deployment": {"graceful_shutdown_timeout_s": 60, "ray_actor_options": {"num_cpus": 0.5}}},
        vision=False,
    )
    events: list[str] = []
    with httpx.Client(timeout=120) as http:
        with app.side_app("drained", config) as base_url:
            response_cm = http.stream(
                "POST",
                f"{base_url}/v1/chat/completions",
                json=chat("medium", stream=True, max_tokens=200, ignore_eos=True),
            )
            response = response_cm.__enter__()
            lines = response.iter_lines()
            next(line for line in lines if '"content"' in line)
        # The app is being removed now; its replica finishes the stream before it stops.
        events = [line for line in lines if line.startswith("data: ")]
        response_cm.__exit__(None, None, None)
    assert events[-1] == "data: [DONE]"
    assert all("error" not in json.loads(e.removeprefix("data: ")) for e in events[:-1])
    finish = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert finish[-1]["choices"][0]["finish_reason"] == "length"
