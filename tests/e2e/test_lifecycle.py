"""Load/unload through Serve's user_config: every replica, in place, 503 while unloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import openai
import pytest
import ray
from ray import serve

from deployments.lifecycle import set_model_loaded
from tests.e2e.conftest import APP_NAME, ServeApp, chat, e2e_config, poll

pytestmark = pytest.mark.e2e


SIDE = "lifecycle"


def replica_pids(model: str, app: str = APP_NAME) -> set[int]:
    """PIDs of the model's replica actors (Serve names them ``SERVE_REPLICA::<app>#<deployment>#<id>``)."""
    prefix = f"SERVE_REPLICA::{app}#model-{model}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    return {ray.get(ray.get_actor(n, namespace="serve").__ray_call__.remote(lambda _: os.getpid())) for n in names}


def test_unload_then_load_again_in_place(app: ServeApp, client: openai.OpenAI) -> None:
    before = replica_pids("tiny")
    assert len(before) == 1
    set_model_loaded("tiny", False)
    try:
        assert app.model_card("tiny")["status"] == "unloaded"
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 503
        assert info.value.body == {
            "message": "model tiny is not loaded",
            "type": "service_unavailable",
            "code": "model_not_loaded",
        }
        # The other model is untouched.
        assert client.chat.completions.create(
            model="medium", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
    finally:
        set_model_loaded("tiny", True)
    assert app.model_card("tiny")["status"] == "loaded"
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert replica_pids("tiny") == before  # reconfigured, never restarted


def test_unload_applies_to_every_replica_and_the_cli_drives_it(app: ServeApp) -> None:
    two = {"num_replicas": 2, "max_ongoing_requests": 4, "ray_actor_options": {"num_cpus": 0.5}}
    with app.side_app(SIDE, e2e_config(app.models_dir, tiny={"deployment": two}, vision=False)) as base_url:
        poll(lambda: len(replica_pids("tiny", SIDE)) == 2, 60, "two tiny replicas")
        cli = [sys.executable, "-m", "deployments.lifecycle"]
        done = subprocess.run([*cli, "unload", "tiny", "--app", SIDE], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        infos = serve.get_deployment_handle("model-tiny", SIDE).broadcast("info").results(timeout_s=10)
        assert [i.status.value for i in infos] == ["unloaded", "unloaded"]
        for _ in range(4):  # whichever replica Serve picks, the answer is the same
            assert httpx.post(f"{base_url}/v1/chat/completions", json=chat("tiny")).status_code == 503
        assert app.model_card("tiny")["status"] == "loaded"  # the main app's model is another deployment
        unknown = subprocess.run([*cli, "unload", "nope", "--app", SIDE], capture_output=True, text=True, timeout=120)
        assert unknown.returncode != 0 and "model 'nope' not found" in unknown.stderr


@pytest.mark.parametrize("model", ["medium", "vision"])
def test_unloading_mid_stream_ends_the_stream_with_an_error_not_done(app: ServeApp, model: str) -> None:
    """Both engines: the stream in flight gets a terminal error event, never a bare ``[DONE]``."""
    body = chat(model, stream=True, max_tokens=1500, ignore_eos=True)
    try:
        with app.http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            next(line for line in lines if '"content"' in line)
            set_model_loaded(model, False)
            events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    finally:
        set_model_loaded(model, True)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "model_unloaded"
    assert not any('"finish_reason":"' in event for event in events)
