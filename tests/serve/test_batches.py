"""The Batch API on Serve with the fake engine: the official SDK's files and batches calls, line
failures, validation, cancellation, yielding to interactive requests, and nothing lost when the
runner or the whole app restarts mid-batch."""

from __future__ import annotations

import json
import sqlite3
import threading
from typing import Any

import httpx
import openai
import pytest
import ray
from openai.types import Batch
from ray import serve

from tests.conftest import poll
from tests.fakes import Script, scripted
from tests.serve.conftest import APP, MAX_FILE_BYTES, FakeApp, fake_config

CHAT = "/v1/chat/completions"
FINISHED = {"completed", "failed", "expired", "cancelled"}


def request_line(i: int, script: Script | None = None, **body: Any) -> dict[str, Any]:
    return {"custom_id": f"req-{i}", "method": "POST", "url": CHAT, "body": scripted(script) | body}


def upload(client: openai.OpenAI, lines: list[dict[str, Any]] | bytes) -> str:
    data = lines if isinstance(lines, bytes) else b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    return client.files.create(file=("requests.jsonl", data), purpose="batch").id


def start(client: openai.OpenAI, lines: list[dict[str, Any]] | bytes) -> Batch:
    return client.batches.create(input_file_id=upload(client, lines), endpoint=CHAT, completion_window="24h")


def wait(client: openai.OpenAI, batch_id: str, timeout_s: float = 60, statuses: set[str] = FINISHED) -> Batch:
    found: list[Batch] = []

    def reached() -> bool:
        try:
            found[:] = [client.batches.retrieve(batch_id)]
        except openai.APIError:  # the app is being redeployed
            return False
        return found[0].status in statuses

    poll(reached, timeout_s, f"batch {batch_id} to reach {statuses}")
    return found[0]


def completed(client: openai.OpenAI, batch_id: str) -> int:
    """The batch's completed lines so far (0 while the app is being redeployed)."""
    try:
        counts = client.batches.retrieve(batch_id).request_counts
    except openai.APIError:
        return 0
    return counts.completed if counts else 0


def results(client: openai.OpenAI, batch: Batch) -> dict[str, dict[str, Any]]:
    """Every line of the output and error files by custom_id, each present exactly once."""
    lines = []
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id is not None:
            lines += [json.loads(raw) for raw in client.files.content(file_id).text.splitlines()]
    ids = [line["custom_id"] for line in lines]
    assert len(ids) == len(set(ids)), "a custom_id appears twice"
    return {line["custom_id"]: line for line in lines}


def kill_runner() -> None:
    prefix = f"SERVE_REPLICA::{APP}#BatchRunner#"
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def test_a_batch_answers_every_line_once_through_the_serving_path(client: openai.OpenAI) -> None:
    lines = [request_line(i) for i in range(10)]
    lines += [request_line(10, Script(fail_after=0, fail="invalid")), request_line(11, model="no-such-model")]
    batch = start(client, lines)
    assert batch.status == "validating" and batch.endpoint == CHAT and batch.input_file_id

    batch = wait(client, batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.model_dump() == {"total": 12, "completed": 10, "failed": 2}
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    found = results(client, batch)
    assert set(found) == {f"req-{i}" for i in range(12)}
    answer = found["req-3"]["response"]
    assert answer["status_code"] == 200 and answer["body"]["object"] == "chat.completion"
    assert answer["body"]["choices"][0]["message"]["content"] == "Hello, world"
    assert found["req-10"]["response"]["status_code"] == 400
    assert found["req-11"]["response"]["body"]["error"]["code"] == "model_not_found"

    outputs = {f.id for f in client.files.list(purpose="batch_output")}
    assert {batch.output_file_id, batch.error_file_id} <= outputs
    listed = client.batches.list(limit=1)
    assert [b.id for b in listed.data] == [batch.id] and listed.has_more is not None
    assert client.files.retrieve(batch.input_file_id).purpose == "batch"
    assert client.files.delete(batch.input_file_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.content(batch.input_file_id)


def test_a_malformed_file_fails_validation_naming_each_line(client: openai.OpenAI) -> None:
    good = json.dumps(request_line(1)).encode()
    wrong_url = json.dumps(request_line(2) | {"url": "/v1/embeddings"}).encode()
    batch = wait(client, start(client, b"\n".join([good, b"{oops", good, wrong_url])).id)
    assert batch.status == "failed" and batch.failed_at
    assert {(e.line, e.code) for e in batch.errors.data} == {
        (2, "invalid_line"),
        (3, "duplicate_custom_id"),
        (4, "mismatched_url"),
    }
    assert batch.output_file_id is None and batch.error_file_id is None


def test_bad_calls_get_clear_errors(fake_app: FakeApp, client: openai.OpenAI) -> None:
    http = fake_app.http
    not_multipart = http.post("/v1/files", json={"purpose": "batch"})
    assert not_multipart.status_code == 415 and "multipart/form-data" in not_multipart.json()["error"]["message"]
    wrong_purpose = http.post("/v1/files", files={"file": ("a.jsonl", b"{}")}, data={"purpose": "fine-tune"})
    assert wrong_purpose.status_code == 400 and "purpose" in wrong_purpose.json()["error"]["message"]
    too_large = http.post(
        "/v1/files", files={"file": ("a.jsonl", b"x" * (MAX_FILE_BYTES + 1))}, data={"purpose": "batch"}
    )
    assert too_large.status_code == 413 and "batch.max_file_bytes" in too_large.json()["error"]["message"]
    no_file = http.post("/v1/files", files={"purpose": (None, "batch")})
    assert no_file.status_code == 400 and "file: required" in no_file.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="no file with id"):
        client.batches.create(input_file_id="file-missing", endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.NotFoundError, match="no batch with id"):
        client.batches.retrieve("batch_missing")
    bad_window = http.post("/v1/batches", json={"input_file_id": "f", "endpoint": CHAT, "completion_window": "1h"})
    assert bad_window.status_code == 400 and "completion_window" in bad_window.json()["error"]["message"]
    bad_endpoint = http.post("/v1/batches", json={"input_file_id": "f", "endpoint": "/v1/images"})
    assert bad_endpoint.status_code == 400 and "endpoint" in bad_endpoint.json()["error"]["message"]
    assert http.get("/v1/batches", params={"limit": 0}).status_code == 400

    done = wait(client, start(client, [request_line(1)]).id)
    with pytest.raises(openai.ConflictError, match="only a validating or in-progress batch"):
        client.batches.cancel(done.id)


def test_a_cancelled_batch_stops_its_lines_in_the_engine_and_lists_the_rest(
    fake_app: FakeApp, client: openai.OpenAI
) -> None:
    before = fake_app.counters()
    slow = Script(tokens=["x"] * 200, delay_s=0.05)
    batch = start(client, [request_line(i, slow) for i in range(8)])
    poll(lambda: fake_app.counters()["started"] > before["started"], 30, "lines running")
    with pytest.raises(openai.ConflictError, match="cancel it first"):
        client.files.delete(batch.input_file_id)  # a running batch's input stays
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    batch = wait(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelling_at and batch.cancelled_at
    found = results(client, batch)
    assert set(found) == {f"req-{i}" for i in range(8)}
    assert {line["error"]["code"] for line in found.values() if line["response"] is None} == {"batch_cancelled"}
    poll(lambda: fake_app.counters()["closed_early"] > before["closed_early"], 10, "the engine to stop the lines")


def test_batch_lines_wait_while_an_interactive_request_runs(fake_app: FakeApp, client: openai.OpenAI) -> None:
    replica = serve.get_deployment_handle("model-fake", APP)
    waits_before = replica.priorities.remote().result(timeout_s=10)["background_waits"]
    interactive = scripted(Script(tokens=["y"] * 40, delay_s=0.05), stream=True)
    first_chunk, finished = threading.Event(), threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{fake_app.base_url}/v1/chat/completions", json=interactive, timeout=60) as r:
            for _ in r.iter_lines():
                first_chunk.set()
        finished.set()

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        assert first_chunk.wait(30)
        batch = start(client, [request_line(i) for i in range(3)])
        poll(lambda: replica.priorities.remote().result(timeout_s=10)["background_waits"] > waits_before, 30,
             "a batch line to wait for the interactive request")  # fmt: skip
        counts = client.batches.retrieve(batch.id).request_counts
        if replica.priorities.remote().result(timeout_s=10)["interactive"]:  # still running: nothing started
            assert counts is None or counts.completed == 0
    finally:
        thread.join(60)
    assert finished.is_set()
    batch = wait(client, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 3


@pytest.mark.slow
def test_nothing_is_lost_when_the_runner_or_the_app_restarts_mid_batch(
    fake_app: FakeApp, client: openai.OpenAI
) -> None:
    lines = [request_line(i, Script(tokens=["z"] * 20, delay_s=0.05)) for i in range(40)]
    batch = start(client, lines)

    poll(lambda: completed(client, batch.id) >= 2, 60, "a few lines done")
    kill_runner()  # Serve starts another, which carries on from the store
    before = completed(client, batch.id)
    poll(lambda: completed(client, batch.id) > before, 60, "the new runner to carry on")
    serve.delete(APP)  # the whole app goes, and comes back
    fake_app.redeploy(fake_config(fake_app.gguf))
    batch = wait(client, batch.id, timeout_s=120)
    assert batch.status == "completed"
    assert batch.request_counts.model_dump() == {"total": 40, "completed": 40, "failed": 0}
    found = results(client, batch)
    assert set(found) == {f"req-{i}" for i in range(40)}
    assert all(line["response"]["status_code"] == 200 for line in found.values())


def test_an_interactive_request_preempts_running_batch_lines_which_run_again_whole(
    fake_app: FakeApp, client: openai.OpenAI
) -> None:
    replica = serve.get_deployment_handle("model-fake", APP)
    before, counters = replica.priorities.remote().result(timeout_s=10), fake_app.counters()
    slow = Script(tokens=[f"t{i} " for i in range(30)], delay_s=0.05)
    batch = start(client, [request_line(i, slow) for i in range(2)])
    poll(lambda: fake_app.counters()["started"] >= counters["started"] + 2, 30, "both lines in the engine")
    answer = client.chat.completions.create(**scripted(Script(tokens=["now"])))  # interactive
    assert answer.choices[0].message.content == "now"
    after = replica.priorities.remote().result(timeout_s=10)
    assert after["preemptions"] >= before["preemptions"] + 2
    assert fake_app.counters()["closed_early"] >= counters["closed_early"] + 2  # stopped in the engine
    batch = wait(client, batch.id)
    assert batch.status == "completed"
    for line in results(client, batch).values():  # run again from the start: whole, nothing twice
        assert line["response"]["body"]["choices"][0]["message"]["content"] == "".join(slow.tokens)


@pytest.mark.slow
def test_a_batch_past_its_window_expires_and_lists_the_lines_it_never_ran(
    fake_app: FakeApp, client: openai.OpenAI
) -> None:
    batch = start(client, [request_line(i, Script(tokens=["w"] * 20, delay_s=0.05)) for i in range(40)])
    poll(lambda: completed(client, batch.id) >= 1, 60, "a line done")
    with sqlite3.connect(fake_app.gguf.parent / "batches" / "batches.sqlite3") as db:  # the window closes now
        db.execute("UPDATE batches SET expires_at = 0 WHERE id = ?", (batch.id,))
    kill_runner()  # the runner that starts reads the window anew
    batch = wait(client, batch.id, timeout_s=120)
    assert batch.status == "expired" and batch.expired_at
    found = results(client, batch)
    assert set(found) == {f"req-{i}" for i in range(40)}
    never = [line for line in found.values() if line["response"] is None]
    assert never and {line["error"]["code"] for line in never} == {"batch_expired"}
    assert batch.request_counts.completed + len(never) == 40


@pytest.mark.slow
def test_background_prefills_bound_batch_lines_only_while_interactive_requests_come(
    fake_app: FakeApp, client: openai.OpenAI
) -> None:
    """Two models, the same bound: one just had an interactive request, the other none (the engine's
    whole batch goes to the lines)."""
    bounded = {"background_prefills": 1, "background_prefills_window_s": 600}
    fake_app.redeploy(fake_config(fake_app.gguf, fake=bounded, quiet=bounded))
    try:
        assert client.chat.completions.create(**scripted(Script(tokens=["now"]))).choices[0].message.content
        slow_prompt = Script(first_delay_s=0.5, tokens=["a", "b"], delay_s=0.1)
        lines = [request_line(i, slow_prompt, model="fake" if i % 2 else "quiet") for i in range(8)]
        batch = wait(client, start(client, lines).id)
        assert batch.status == "completed" and batch.request_counts.completed == 8
        assert fake_app.counters("fake")["most_prefilling"] == 1  # the others waited for its first token
        assert fake_app.counters("quiet")["most_prefilling"] >= 2
    finally:
        fake_app.redeploy(fake_config(fake_app.gguf))
