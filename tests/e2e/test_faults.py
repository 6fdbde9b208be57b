"""Faults: nothing hangs, nothing is silently lost."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import httpx
import openai
import pytest
import ray
from ray import serve

from deployments.config import AppConfig
from tests.e2e.conftest import ServeApp, chat, e2e_config, poll

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LONG = {"max_tokens": 1500, "ignore_eos": True}


def kill_replica(app_name: str, model: str) -> None:
    prefix = f"SERVE_REPLICA::{app_name}#model-{model}#"
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def test_a_replica_killed_mid_request_fails_it_clearly_and_is_replaced(app: ServeApp) -> None:
    side = "killed"
    with app.side_app(side, e2e_config(app.models_dir, vision=False)) as base_url:

        def replaced() -> None:  # Serve starts a new replica; the next requests succeed
            poll(
                lambda: (
                    httpx.post(
                        f"{base_url}/v1/chat/completions", json=chat("medium", max_tokens=3), timeout=30
                    ).status_code
                    == 200
                ),
                120,
                "a new medium replica",
            )

        # A stream in flight ends with a terminal SSE error event, not a hang or a silent cut.
        with httpx.Client(base_url=base_url, timeout=60) as http:
            with http.stream("POST", "/v1/chat/completions", json=chat("medium", stream=True, **LONG)) as response:
                lines = response.iter_lines()
                next(line for line in lines if '"content"' in line)
                kill_replica(side, "medium")
                events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["code"] == "replica_died" and "retry" in error["message"]
        replaced()

        # A non-streaming request in flight gets a 502 saying what happened.
        outcome: dict[str, httpx.Response] = {}
        caller = threading.Thread(
            target=lambda: outcome.setdefault(
                "response", httpx.post(f"{base_url}/v1/chat/completions", json=chat("medium", **LONG), timeout=60)
            )
        )
        caller.start()
        poll(lambda: app.active_generations("medium", side) == 1, 30, "the request to reach the engine")
        kill_replica(side, "medium")
        caller.join(timeout=60)
        assert outcome["response"].status_code == 502, outcome["response"].text[:300]
        assert outcome["response"].json()["error"]["code"] == "replica_died"
        replaced()


def test_a_model_that_fails_to_load_is_reported_and_the_others_keep_serving(app: ServeApp, tmp_path: Path) -> None:
    broken_gguf = tmp_path / "broken-Q4_0.gguf"
    broken_gguf.write_bytes(b"GGUF" + b"\0" * 64)
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(app.models_dir / "tiny-idefics3", no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    once = {"max_constructor_retry_count": 1, "ray_actor_options": {"num_cpus": 0.5}}
    config = AppConfig.model_validate(
        {
            "models": [
                {
                    "name": "tiny",
                    "kind": "gguf",
                    "path": str(app.models_dir / "tiny-llama-Q4_K_M.gguf"),
                    "deployment": {"ray_actor_options": {"num_cpus": 0.5}},
                },
                {"name": "broken", "kind": "gguf", "path": str(broken_gguf), "deployment": once},
                {
                    "name": "tokenless",
                    "kind": "vision",
                    "path": str(no_tokenizer),
                    "kv_cache_bytes": 2**25,
                    "deployment": once,
                },
            ]
        }
    )
    side = "failing"
    with app.side_app(side, config, may_fail=True) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        poll(
            lambda: serve.status().applications[side].deployments["model-tokenless"].status != "UPDATING",
            120,
            "the vision replica to give up",
        )
        cards = {m.id: m.model_dump() for m in client.models.list()}
        assert cards["broken"]["status"] == "failed"
        assert "broken-Q4_0.gguf is not a readable GGUF file" in cards["broken"]["error"]
        assert cards["tokenless"]["status"] == "failed" and cards["tokenless"]["error"]
        deployments = serve.status().applications[side].deployments
        assert "not a readable GGUF file" in deployments["model-broken"].message
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 503
        assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)


def replica_pid(app_name: str, model: str) -> int:
    prefix = f"SERVE_REPLICA::{app_name}#model-{model}#"
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    return ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(lambda _: __import__("os").getpid()))


def test_a_stalled_engine_ends_its_requests_by_deadline_and_serve_restarts_the_replica(app: ServeApp) -> None:
    """A real stall: vLLM's engine-core process is stopped (SIGSTOP) mid-stream."""
    import os
    import signal

    import psutil

    vision = {
        "name": "vision",
        "kind": "vision",
        "path": str(app.models_dir / "tiny-idefics3"),
        "context_size": 32768,
        "kv_cache_bytes": 80 * 2**20,
        "stall_timeout_s": 3,
        "deployment": {
            "health_check_period_s": 1,
            "health_check_timeout_s": 10,
            "ray_actor_options": {"num_cpus": 0.5},
        },
    }
    side = "stalled"
    with app.side_app(side, AppConfig.model_validate({"models": [vision]})) as base_url:
        before = replica_pid(side, "vision")
        (core,) = [
            p
            for p in psutil.Process(before).children(recursive=True)
            if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()
        ]
        body = chat("vision", content="go", stream=True, max_tokens=30000, ignore_eos=True, chunk_timeout_s=1)
        try:
            with httpx.Client(base_url=base_url, timeout=60) as http:
                with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    lines = response.iter_lines()
                    next(line for line in lines if '"content"' in line)
                    os.kill(core.pid, signal.SIGSTOP)
                    events = [line for line in lines if line.startswith("data: ")]
            # The chunk deadline ended the request...
            assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "chunk_timeout"
            # ...and the health check, finding the engine silent, made Serve replace the replica.
            poll(lambda: _replica_pid_or_none(side) not in (None, before), 120, "Serve to replace the stalled replica")
            poll(lambda: _serves(base_url), 180, "the new replica to serve")
        finally:
            if psutil.pid_exists(core.pid):
                os.kill(core.pid, signal.SIGKILL)


def _serves(base_url: str) -> bool:
    """One request answered; one that waits out its timeout (the replica is still starting) is a no."""
    try:
        return httpx.post(f"{base_url}/v1/chat/completions", json=chat("vision", max_tokens=3), timeout=20).is_success
    except httpx.TimeoutException:
        return False


def _replica_pid_or_none(app_name: str) -> int | None:
    try:
        return replica_pid(app_name, "vision")
    except (ValueError, ray.exceptions.RayActorError):
        return None
