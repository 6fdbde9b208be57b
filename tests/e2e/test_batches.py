"""The Batch API end to end: image requests to real vLLM (and text to llama.cpp) in one batch,
through the official SDK's files and batches calls, and the batch command a pipeline author runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import poll
from tests.e2e.conftest import ServeApp
from tests.e2e.test_vision import BLUE, RED, png, vision_messages

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
ROOT = Path(__file__).resolve().parents[2]


def line(custom_id: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": {"max_tokens": 8, "temperature": 0} | body}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in lines)


def test_a_batch_of_image_requests_through_the_openai_sdk(client: openai.OpenAI) -> None:
    colors = [RED, BLUE, RED, BLUE]
    lines = [line(f"image-{i}", model="vision", messages=vision_messages(url)) for i, url in enumerate(colors)]
    lines.append(line("text", model="tiny", messages=[{"role": "user", "content": "hello"}]))
    broken = "data:image/png;base64," + png("red").hex()  # not base64
    lines.append(line("bad-image", model="vision", messages=vision_messages(broken)))
    file = client.files.create(file=("captions.jsonl", jsonl(lines)), purpose="batch")
    assert file.purpose == "batch" and file.bytes > 0

    batch = client.batches.create(
        input_file_id=file.id, endpoint=CHAT, completion_window="24h", metadata={"job": "captions"}
    )
    poll(lambda: client.batches.retrieve(batch.id).status in ("completed", "failed"), 300, "the batch")
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.metadata == {"job": "captions"}
    assert batch.request_counts.model_dump() == {"total": 6, "completed": 5, "failed": 1}
    assert batch.id in [b.id for b in client.batches.list(limit=100)]

    output = [json.loads(raw) for raw in client.files.content(batch.output_file_id).text.splitlines()]
    errors = [json.loads(raw) for raw in client.files.content(batch.error_file_id).text.splitlines()]
    by_id = {item["custom_id"]: item for item in output + errors}
    assert len(by_id) == len(output) + len(errors) == 6  # each custom_id exactly once
    for i in range(4):
        body = by_id[f"image-{i}"]["response"]["body"]
        assert body["model"] == "vision" and body["object"] == "chat.completion"
        assert body["usage"]["completion_tokens"] == 8 or body["choices"][0]["finish_reason"] == "stop"
    # Greedy and the same image: the same answer, as over HTTP.
    text = {i: by_id[f"image-{i}"]["response"]["body"]["choices"][0]["message"]["content"] for i in range(4)}
    assert text[0] == text[2] and text[1] == text[3]
    assert by_id["text"]["response"]["body"]["model"] == "tiny"
    bad = by_id["bad-image"]["response"]
    assert bad["status_code"] == 400 and bad["body"]["error"]["code"] == "invalid_image"


def test_the_batch_command_runs_a_file_downloads_it_and_resumes(app: ServeApp, tmp_path: Path) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(jsonl([line(f"q-{i}", model="tiny", messages=[{"role": "user", "content": f"n {i}"}])
                                for i in range(5)]))  # fmt: skip
    results = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "deployments.batch", "run", "--base-url", f"{app.base_url}/v1", "--poll-s", "0.2"]
    done = subprocess.run([*command, str(requests), "-o", str(results)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=os.environ | {"TQDM_DISABLE": "0"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "5 completed, 0 failed of 5" in done.stderr
    answers = [json.loads(raw) for raw in results.read_text().splitlines()]
    assert sorted(a["custom_id"] for a in answers) == [f"q-{i}" for i in range(5)]
    assert results.with_name("results.errors.jsonl").read_text() == ""

    (batch_id,) = set(re.findall(r"--resume (batch_\w+)", done.stderr))
    again = tmp_path / "again.jsonl"
    resumed = subprocess.run([*command, "--resume", batch_id, "-o", str(again)], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert again.read_text() == results.read_text()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"custom_id": "x"}\n')
    refused = subprocess.run([*command, str(bad), "-o", str(tmp_path / "o.jsonl")], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert refused.returncode != 0 and "line 1" in refused.stderr
