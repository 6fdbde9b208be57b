"""The request id travels end to end: response header, router log, model replica log."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from tests.e2e.conftest import ServeApp, chat, poll

pytestmark = pytest.mark.e2e


def serve_logs() -> dict[str, str]:
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return {path.name: path.read_text(errors="replace") for path in logs.glob("replica_nika_*.log")}


def test_the_request_id_is_echoed_and_logged_by_router_and_replica(app: ServeApp) -> None:
    response = app.http.post("/v1/chat/completions", json=chat(max_tokens=3))
    request_id = response.headers["x-request-id"]
    assert response.json()["id"] == f"chatcmpl-{request_id}"

    def logged_by(prefix: str) -> bool:
        return any(request_id in text for name, text in serve_logs().items() if name.startswith(prefix))

    poll(lambda: logged_by("replica_nika_Router_"), 10, "the router to log the request id")
    poll(lambda: logged_by("replica_nika_model-tiny_"), 10, "the model replica to log the request id")


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples in Prometheus text whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_prometheus_metrics_after_real_traffic(app: ServeApp) -> None:
    import httpx

    # A finished stream, a fired deadline, an abandoned stream, a refused request, a bad image.
    assert app.http.post("/v1/chat/completions", json=chat(max_tokens=8, ignore_eos=True)).status_code == 200
    timed_out = app.http.post(
        "/v1/chat/completions", json=chat("medium", max_tokens=500, ignore_eos=True, request_timeout_s=0.3)
    )
    assert timed_out.status_code == 504
    with httpx.Client(base_url=app.base_url, timeout=30) as http:
        with http.stream(
            "POST", "/v1/chat/completions", json=chat("medium", stream=True, max_tokens=500, ignore_eos=True)
        ) as response:
            lines = response.iter_lines()
            next(line for line in lines if '"content"' in line)
    assert app.http.post("/v1/chat/completions", json=chat("no-such-model")).status_code == 404
    bad_image = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}
    ]
    assert app.http.post("/v1/chat/completions", json=chat("vision", messages=bad_image)).status_code == 400

    def exported() -> bool:
        # Each node exports the metrics of the replicas it runs.
        text = "\n".join(httpx.get(url, timeout=10).text for url in app.metrics_urls)
        return (
            metric(text, "ray_nika_time_to_first_token_seconds_count", model="tiny") >= 1
            and metric(text, "ray_nika_inter_token_latency_seconds_count", model="tiny") >= 7
            and metric(text, "ray_nika_e2e_request_latency_seconds_count", model="tiny") >= 1
            and metric(text, "ray_nika_generation_tokens_total", model="tiny") >= 8
            and metric(text, "ray_nika_prompt_tokens_total", model="tiny") >= 1
            and metric(text, "ray_nika_deadline_expirations_total", model="medium", reason="request_timeout") >= 1
            and metric(text, "ray_nika_cancellations_total", model="medium") >= 1
            and metric(text, "ray_nika_rejected_requests_total", cause="model_not_found") >= 1
            and metric(text, "ray_nika_image_decode_failures_total") >= 1
            and "ray_nika_num_requests_running" in text
            and "ray_nika_num_requests_waiting" in text
            # the llama.cpp engine's own counters: steps and their passes, admission, sampling
            and metric(text, "ray_nika_engine_passes_total", model="tiny")
            >= metric(text, "ray_nika_engine_steps_total", model="tiny")
            >= 8
            and metric(text, "ray_nika_admission_seconds_total", model="tiny") > 0
            and metric(text, "ray_nika_sampled_tokens_total", model="tiny", where="host") >= 8
        )

    poll(exported, 60, "the metrics to be exported")
