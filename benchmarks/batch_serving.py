"""Comparison: an image batch through our Batch API against ``vllm run-batch``, same model, same run.

Both read the same JSONL file of ``N`` one-image chat requests to the demo VLM. Ours: the time
from ``batches.create`` to ``completed`` (validation, every line through the router's serving
path and the vLLM replica, the output file written). ``vllm run-batch`` loads its engine in the
process it runs the file in, so it runs twice, with one request and with ``N``: its rate is the
difference's. While our batch runs, interactive streaming requests (one at a time) measure the
time to first token beside it; the same requests on the idle server first are the baseline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai

from benchmarks.context import BenchContext
from benchmarks.loadgen import stream_chat
from benchmarks.serving import ratio
from benchmarks.stats import distribution_ms
from benchmarks.systems import vllm_flags
from benchmarks.workloads import image_data_url
from deployments.config import VisionModelConfig
from deployments.engines.vision import VLLMEngine

NAME = "batch_serving"
OURS, PEER = "ours (Batch API)", "vllm run-batch"
REQUESTS, QUICK_REQUESTS = 1000, 100
MAX_TOKENS = 16
IMAGES = 32  # distinct images, cycled over the requests
PROBES_IDLE = 20
TARGET_THROUGHPUT_RATIO = 0.9
TARGET_TTFT_RATIO = 1.2


def batch_file(model: str, n: int, path: Path) -> Path:
    images = [image_data_url(size=96, seed=i) for i in range(IMAGES)]
    with path.open("w") as out:
        for i in range(n):
            content = [{"type": "text", "text": f"Caption image {i}."},
                       {"type": "image_url", "image_url": {"url": images[i % IMAGES]}}]  # fmt: skip
            body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
                    "temperature": 0, "ignore_eos": True}  # fmt: skip
            out.write(json.dumps({"custom_id": f"img-{i}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": body}) + "\n")  # fmt: skip
    return path


def probe(url: str, model: str) -> float | None:
    """One interactive streaming request's time to first token (s)."""
    import asyncio

    payload = {"model": model, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": image_data_url(size=96, seed=999)}}]}],
        "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}  # fmt: skip

    async def once() -> float | None:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            return (await stream_chat(client, payload)).ttft

    return asyncio.run(once())


def ours(ctx: BenchContext, model: VisionModelConfig, requests: Path, n: int) -> dict[str, Any]:
    with ctx.ours.app(ctx.app_config(model)) as url:
        for _ in range(3):  # warm up the engine's image path
            probe(url, model.name)
        idle = [t for t in (probe(url, model.name) for _ in range(PROBES_IDLE)) if t is not None]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=300)
        file = client.files.create(file=requests.open("rb"), purpose="batch")
        started = time.perf_counter()
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
        busy: list[float] = []
        while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled"):
            if (ttft := probe(url, model.name)) is not None:
                busy.append(ttft)
            print(f"   {OURS}: {batch.request_counts.completed if batch.request_counts else 0}/{n}", flush=True)
        wall = time.perf_counter() - started
        counts = batch.request_counts.model_dump() if batch.request_counts else {}
    return {
        "status": batch.status,
        "request_counts": counts,
        "wall_s": round(wall, 2),
        "images_s": round(counts.get("completed", 0) / wall, 3),
        "ttft_idle_ms": distribution_ms(idle),
        "ttft_during_batch_ms": distribution_ms(busy),
        "probes_during_batch": len(busy),
    }


def run_batch(model: VisionModelConfig, requests: Path, output: Path, cache_dir: Path) -> float:
    """Wall seconds of one ``vllm run-batch`` process (engine load included), with our engine arguments."""
    command = [sys.executable, "-m", "vllm.entrypoints.launchers.run_batch", "-i", str(requests), "-o", str(output)]
    env = os.environ | VLLMEngine.replica_env(model, cache_dir)
    started = time.perf_counter()
    subprocess.run(
        command + vllm_flags(model), check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return time.perf_counter() - started


def peer(model: VisionModelConfig, requests: Path, n: int, cache_dir: Path, work: Path) -> dict[str, Any]:
    one = work / "one.jsonl"
    one.write_text(requests.read_text().split("\n", 1)[0] + "\n")
    load = run_batch(model, one, work / "one.out.jsonl", cache_dir)
    total = run_batch(model, requests, work / "peer.out.jsonl", cache_dir)
    answered = sum(1 for raw in (work / "peer.out.jsonl").read_text().splitlines()
                   if json.loads(raw).get("response", {}).get("status_code") == 200)  # fmt: skip
    return {
        "wall_s": round(total, 2),
        "startup_and_one_request_s": round(load, 2),
        "answered": answered,
        "images_s": round((n - 1) / (total - load), 3),
    }


def run(ctx: BenchContext) -> dict[str, Any]:
    model = ctx.vision_model()
    n = QUICK_REQUESTS if ctx.quick else REQUESTS
    with tempfile.TemporaryDirectory(prefix="nika-bench-batch-") as tmp:
        work = Path(tmp)
        requests = batch_file(model.name, n, work / "requests.jsonl")
        systems = {OURS: ours(ctx, model, requests, n)}
        print(f"   {PEER}: {n} requests", flush=True)
        systems[PEER] = peer(model, requests, n, ctx.app_config(model).cache_dir, work)
    throughput = ratio(systems[OURS]["images_s"], systems[PEER]["images_s"])
    idle, busy = systems[OURS]["ttft_idle_ms"], systems[OURS]["ttft_during_batch_ms"]
    ttft = ratio(busy["p50"], idle["p50"]) if idle and busy else None
    return {
        "comparison": f"{n} one-image requests: our Batch API vs vllm run-batch, interactive TTFT beside ours",
        "model": model.name,
        "requests": n,
        "max_tokens": MAX_TOKENS,
        "systems": systems,
        "ratios": {"images_s": throughput, "interactive_ttft_p50_busy_over_idle": ttft},
        "targets": {
            f"images/s >= {TARGET_THROUGHPUT_RATIO}x vllm run-batch": throughput is not None
            and throughput >= TARGET_THROUGHPUT_RATIO,
            f"interactive TTFT p50 during a batch <= {TARGET_TTFT_RATIO}x idle": ttft is not None
            and ttft <= TARGET_TTFT_RATIO,
        },
    }
