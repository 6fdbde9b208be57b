"""Continuous batching on a real llama.cpp replica: many streams in one context, through Serve."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from deployments.lifecycle import set_model_loaded
from tests.conftest import poll
from tests.e2e.conftest import ServeApp, chat, e2e_config

pytestmark = pytest.mark.e2e

SIDE = "batched"
ONE_CPU = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}}


@pytest.fixture(scope="module")
def batched(app: ServeApp) -> Iterator[str]:
    """``medium`` with 8 sequences per context, a KV stream each, sampled in the decode graph
    (llama.cpp's backend samplers, here on its CPU backend); ``tiny`` with 4 in one KV pool that
    holds 2 requests, sampled on the host."""
    config = e2e_config(
        app.models_dir,
        medium={"parallel": 8, "context_size": 1024, "backend_sampling": True, "deployment": ONE_CPU},
        tiny={"parallel": 4, "context_size": 512, "kv_cache_tokens": 512, "deployment": ONE_CPU},
        vision=False,
    )
    with app.side_app(SIDE, config) as base_url:
        yield base_url


def stats(app: ServeApp, model: str) -> dict[str, float]:
    return app.model_card(model, SIDE)["engine_stats"]


def stream(base_url: str, body: dict[str, Any], events: list[tuple[str, float, dict[str, Any]]]) -> None:
    """Stream ``body``; record (kind, time, event) for the first token, each chunk and the end."""
    with httpx.Client(base_url=base_url, timeout=120) as http:
        with http.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line.removeprefix("data: "))
                    events.append(("chunk", time.monotonic(), event))
    events.append(("end", time.monotonic(), {}))


def run_together(base_url: str, bodies: list[dict[str, Any]]) -> list[list[tuple[str, float, dict[str, Any]]]]:
    records: list[list[tuple[str, float, dict[str, Any]]]] = [[] for _ in bodies]
    threads = [threading.Thread(target=stream, args=(base_url, b, r)) for b, r in zip(bodies, records, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return records


def text_of(record: list[tuple[str, float, dict[str, Any]]]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or "" for kind, _, e in record if kind == "chunk" and e["choices"]
    )


def usage_of(record: list[tuple[str, float, dict[str, Any]]]) -> dict[str, Any]:
    return next(e["usage"] for kind, _, e in reversed(record) if kind == "chunk" and e.get("usage"))


def test_eight_streams_on_one_replica_run_together(app: ServeApp, batched: str) -> None:
    body = chat("medium", max_tokens=96, ignore_eos=True, stream_options={"include_usage": True})
    records = run_together(
        batched, [body | {"messages": [{"role": "user", "content": f"story {i}"}]} for i in range(8)]
    )
    first_tokens = [
        next(t for kind, t, e in r if kind == "chunk" and e["choices"] and e["choices"][0]["delta"].get("content"))
        for r in records
    ]
    ends = [r[-1][1] for r in records]
    assert max(first_tokens) < min(ends), "a stream started only after another had finished"
    assert all(usage_of(r)["completion_tokens"] == 96 for r in records)
    assert stats(app, "medium")["peak_batch_size"] == 8  # the engine's own count: 8 sequences in one step
    card = app.model_card("medium", SIDE)
    assert card["engine_stats"]["parallel"] == 8 and card["active_generations"] == 0


def test_a_constrained_request_samples_on_the_host_beside_streams_sampled_in_the_graph(
    app: ServeApp, batched: str
) -> None:
    """A grammar runs on the host only: that request leaves the graph, the others stay in it."""
    client = openai.OpenAI(base_url=f"{batched}/v1", api_key="unused", max_retries=0)
    before = stats(app, "medium")
    results: list[Any] = [None] * 4

    def ask(i: int) -> None:
        schema = {
            "type": "object",
            "properties": {"color": {"enum": ["red", "blue"]}},
            "required": ["color"],
            "additionalProperties": False,
        }
        format_ = {"type": "json_schema", "json_schema": {"name": "color", "schema": schema}}
        constrained = {"response_format": format_} if i == 0 else {}
        results[i] = client.chat.completions.create(
            model="medium",
            messages=[{"role": "user", "content": f"item {i} as JSON"}],
            max_tokens=48,
            temperature=0.7,
            seed=i,
            **constrained,
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert json.loads(results[0].choices[0].message.content)["color"] in ("red", "blue")
    assert all(r.usage.completion_tokens > 0 for r in results[1:])
    after = stats(app, "medium")

    def sampled(r: Any) -> int:  # an end of generation is sampled too, and not a completion token
        return r.usage.completion_tokens + (r.choices[0].finish_reason == "stop")

    assert after["host_sampled"] - before["host_sampled"] == sampled(results[0])
    assert after["backend_sampled"] - before["backend_sampled"] == sum(sampled(r) for r in results[1:])


def test_concurrent_requests_each_get_their_own_generation(batched: str) -> None:
    """16 greedy requests, 8 at a time in one context: each keeps its own prompt, length and text.

    Their texts are not compared with solo runs: a sequence's batch companions change the shape
    of each pass, and so the order of the sums in the kernels, which flips the random model's
    near-tied greedy tokens (tests/e2e/test_llama_engine.py shows the engine's outputs equal solo
    runs exactly when a request runs alone in the same batched engine).
    """
    bodies = [
        chat(
            "medium",
            content="word " * (i + 1),
            temperature=0,
            max_tokens=8 + i,
            ignore_eos=True,
            stream_options={"include_usage": True},
        )
        for i in range(16)
    ]
    url = f"{batched}/v1/chat/completions"
    prompts = [httpx.post(url, json=b | {"max_tokens": 1}, timeout=60).json()["usage"]["prompt_tokens"] for b in bodies]
    assert len(set(prompts)) == 16
    records = run_together(batched, bodies)
    for i, record in enumerate(records):
        usage = usage_of(record)
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompts[i], 8 + i)
        assert text_of(record)  # its own tokens, streamed to its own client


def test_cancelling_one_stream_leaves_the_others_whole_and_frees_its_cells(app: ServeApp, batched: str) -> None:
    set_model_loaded("medium", False, app_name=SIDE)  # a fresh engine: no caches from the tests before
    set_model_loaded("medium", True, app_name=SIDE)
    long = chat("medium", max_tokens=200, ignore_eos=True, stream_options={"include_usage": True})
    bodies = [long | {"messages": [{"role": "user", "content": f"keep going {i}"}]} for i in range(3)]
    records: list[list[tuple[str, float, dict[str, Any]]]] = []
    others = threading.Thread(target=lambda: records.extend(run_together(batched, bodies)))
    others.start()
    with httpx.Client(base_url=batched, timeout=120) as http:
        body = long | {"stream": True, "messages": [{"role": "user", "content": "cancel me"}]}
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()  # held: a collected iter_lines() closes the response
            next(line for line in lines if '"content"' in line)
            poll(lambda: stats(app, "medium")["running"] == 4, 30, "all four in the batch")
    # Leaving the block closed the connection: the engine drops the sequence at its next step.
    poll(lambda: stats(app, "medium")["running"] <= 3, 10, "the cancelled sequence to leave the batch")
    others.join(timeout=300)
    assert [usage_of(r)["completion_tokens"] for r in records] == [200, 200, 200]
    # The finished sequences keep their cells as prefix caches (prompt + every decoded token: all but
    # the last sampled one); the cancelled one's are gone.
    cells = stats(app, "medium")["kv_cache_usage_perc"] * 1024 * 8
    assert cells == sum(usage_of(r)["prompt_tokens"] + 199 for r in records)


def test_a_repeated_system_prompt_comes_from_the_cache(batched: str) -> None:
    client = openai.OpenAI(base_url=f"{batched}/v1", api_key="unused", max_retries=0, timeout=120)
    system = {"role": "system", "content": "You are a careful assistant. " * 20}
    first = client.chat.completions.create(
        model="medium", messages=[system, {"role": "user", "content": "first"}], max_tokens=4
    )
    second = client.chat.completions.create(
        model="medium", messages=[system, {"role": "user", "content": "second"}], max_tokens=4
    )
    assert first.usage is not None and second.usage is not None
    cached = second.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
    assert cached >= 100 and cached < second.usage.prompt_tokens


def test_more_prompts_than_parallel_stay_cached(app: ServeApp, batched: str) -> None:
    """``medium`` has 8 slots; the prompts of 12 conversations all stay cached: the last one in its
    slot, the others in host memory (an idle slot's prompt is copied there while nothing runs and
    leaves the pool when a new request is admitted, llama-server's --cache-idle-slots), and come
    back from there."""
    client = openai.OpenAI(base_url=f"{batched}/v1", api_key="unused", max_retries=0, timeout=120)

    def ask(i: int) -> Any:
        content = f"{i} " + " ".join(f"topic{i}-{j}" for j in range(40))
        answer = client.chat.completions.create(
            model="medium", messages=[{"role": "user", "content": content}], max_tokens=1
        )
        assert answer.usage is not None
        return answer.usage

    before = stats(app, "medium")
    for i in range(12):
        ask(i)
    assert stats(app, "medium")["prompt_cache_entries"] >= 11
    for i in (11, 0):  # from its slot, from host memory
        again = ask(i)
        assert again.prompt_tokens_details.cached_tokens == again.prompt_tokens - 1  # type: ignore[union-attr]
    after = stats(app, "medium")
    assert after["admitted"] - before["admitted"] == 14
    # The engine's own clock: a slot came at once (nothing else ran), the first token after it.
    queued, first_token = (after[k] - before[k] for k in ("queue_seconds", "first_token_seconds"))
    assert 0 <= queued < first_token


def test_a_burst_beyond_the_kv_pool_waits_and_none_fails(app: ServeApp, batched: str) -> None:
    """``tiny``'s pool holds 512 cells: two requests of ~250; eight arrive at once."""
    body = chat("tiny", max_tokens=220, ignore_eos=True, stream_options={"include_usage": True})
    records = run_together(batched, [body | {"messages": [{"role": "user", "content": f"b{i}"}]} for i in range(8)])
    assert [usage_of(r)["completion_tokens"] for r in records] == [220] * 8
    assert stats(app, "tiny")["peak_batch_size"] <= 2  # the budget admitted no more than fit


def test_a_prompt_that_can_never_fit_is_400(batched: str) -> None:
    response = httpx.post(
        f"{batched}/v1/chat/completions", json=chat("tiny", content="word " * 600, max_tokens=8), timeout=60
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
