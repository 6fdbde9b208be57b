"""Comparison: an image batch through our Batch API against ``vllm run-batch``, same model, same run.

Both read the same JSONL file of ``N`` one-image chat requests to the demo VLM. Ours, at each
``batch.concurrency`` of ``CONCURRENCY`` (the targets are read at the default): the time
from ``batches.create`` to ``completed`` (validation, every line through the router's serving
path and the vLLM replica, the output file written). ``vllm run-batch`` loads its engine in the
process it runs the file in: its rate is its own progress bar's, from the requests' submission to
the last answer; its processes' CPU time is clocked over that span, as ours over the batch's. Ours
then runs the file again with interactive streaming requests beside it (one at a time,
``PROBE_INTERVAL_S`` apart) for their time to first token; the same requests on the idle
server first are the baseline. The batch alone starts once the replica has had no interactive
request for ``background_prefills_window_s``, so its lines have the engine's whole batch; beside
interactive requests ``background_prefills`` bounds them again. The batch's rate with them beside
it is reported too: it gives them the replica (its lines wait, and running ones are preempted)
each time one comes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai

from benchmarks.context import BenchContext
from benchmarks.loadgen import stream_chat
from benchmarks.serving import ratio
from benchmarks.stats import distribution_ms
from benchmarks.systems import LOG_DIR, CpuClock, vllm_flags
from benchmarks.workloads import image_data_url
from deployments.batch.runner import batch_concurrency
from deployments.config import VisionModelConfig
from deployments.engines.vision import VLLMEngine

NAME = "batch_serving"
OURS, PEER = "ours (Batch API)", "vllm run-batch"
REQUESTS, QUICK_REQUESTS = 1000, 100
MAX_TOKENS = 16
IMAGES = 32  # distinct images, cycled over the requests
PROBES_IDLE = 20
CONCURRENCY = (4, 8, 16, 24)  # batch.concurrency: lines in flight, of the vision replica's 32 slots
DEFAULT_CONCURRENCY = 16  # what batch.concurrency defaults to for it: half its slots
BACKGROUND_PREFILLS = 2  # as serve_config.yaml's vision model: short engine steps for interactive requests
PROBE_INTERVAL_S = 0.5  # interactive requests beside the second batch: one at a time, this far apart
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


def run_ours(client: openai.OpenAI, requests: Path, n: int, label: str) -> tuple[Any, float]:
    """One batch of the file, from ``batches.create`` to its end: (the batch, wall seconds)."""
    file = client.files.create(file=requests.open("rb"), purpose="batch")
    started = time.perf_counter()
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled"):
        time.sleep(0.25)
        print(f"   {label}: {batch.request_counts.completed if batch.request_counts else 0}/{n}", flush=True)
    return batch, time.perf_counter() - started


def ours(ctx: BenchContext, model: VisionModelConfig, requests: Path, n: int, concurrency: int) -> dict[str, Any]:
    """At one ``batch.concurrency``: the batch alone (images/s), then again with interactive
    requests arriving beside it (their TTFT, and the batch's rate meanwhile); the same requests on
    the idle server first, as the baseline."""
    config = ctx.app_config(model)
    config = config.model_copy(update={"batch": config.batch.model_copy(update={"concurrency": concurrency})})
    label = f"{OURS}, concurrency {concurrency}"
    with ctx.ours.app(config) as url:
        for _ in range(3):  # warm up the engine's image path
            probe(url, model.name)
        idle = [t for t in (probe(url, model.name) for _ in range(PROBES_IDLE)) if t is not None]
        time.sleep(model.background_prefills_window_s)  # no interactive request within it: the batch alone
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=300)
        clock = cpu_clock(ctx, model.name)
        clock.start()
        alone, alone_s = run_ours(client, requests, n, label)
        cpu = clock.stop()
        busy: list[float] = []
        stop = threading.Event()

        def interactive() -> None:
            while not stop.wait(PROBE_INTERVAL_S):
                if (ttft := probe(url, model.name)) is not None:
                    busy.append(ttft)

        prober = threading.Thread(target=interactive)
        prober.start()
        try:
            beside, beside_s = run_ours(client, requests, n, f"{label}, interactive requests beside it")
        finally:
            stop.set()
            prober.join()
        preemptions = ctx.ours.model_handle(model.name).priorities.remote().result()["preemptions"]
    idle_ms, busy_ms = distribution_ms(idle), distribution_ms(busy)
    return {
        "status": alone.status,
        "request_counts": alone.request_counts.model_dump() if alone.request_counts else {},
        "wall_s": round(alone_s, 2),
        "images_s": round(_completed(alone) / alone_s, 3),
        "cpu_ms_per_image": {
            name: round(1000 * s / max(1, _completed(alone)), 2) for name, s in cpu.items() if name != "machine busy"
        },
        "machine_busy": round(cpu["machine busy"], 3),
        "ttft_idle_ms": idle_ms,
        "ttft_during_batch_ms": busy_ms,
        "ttft_p50_ratio": ratio(busy_ms["p50"], idle_ms["p50"]) if idle_ms and busy_ms else None,
        "probes_during_batch": len(busy),
        "images_s_with_interactive_requests": round(_completed(beside) / beside_s, 3),
        "preemptions": preemptions,
    }


def cpu_clock(ctx: BenchContext, model: str) -> CpuClock:
    """The processes a batch line passes through: the runner (parse, validate, check the image, one
    Serve call), the vLLM replica (Serve's request handling, vLLM's input and output processing)
    and its engine core (the model); on 2 cores they share the CPUs the engine needs."""
    import psutil

    (replica,) = ctx.ours.replica_pids(model)
    return CpuClock(
        {
            "batch runner": ctx.ours.deployment_pids("BatchRunner"),
            "vllm replica": [replica],
            "vllm engine core": [p.pid for p in psutil.Process(replica).children(recursive=True)],
        }
    )


def _completed(batch: Any) -> int:
    return batch.request_counts.completed if batch.request_counts else 0


class _GrowingLog:
    """A log file read as it grows: each look reads only what is new (and the end of what was before, for a
    match across two reads)."""

    def __init__(self, path: Path) -> None:
        self._file = path.open(errors="replace")
        self._rest = ""

    def wait_for(self, process: subprocess.Popen[bytes], pattern: re.Pattern[str]) -> bool:
        """Until ``pattern`` shows (True) or the process ends (False)."""
        while process.poll() is None:
            text = self._rest + self._file.read()
            if match := pattern.search(text):
                self._rest = text[match.end() :]
                return True
            self._rest = text[-200:]
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._file.close()


def peer(model: VisionModelConfig, requests: Path, n: int, cache_dir: Path, work: Path) -> dict[str, Any]:
    """``vllm run-batch`` on the file with our engine arguments. Its rate is its own progress bar's
    (requests over the time from their submission to the last answer: engine load excluded, as
    ours excludes the replica's); its CPU time per image is clocked over the same span, from the
    bar's first draw to its last step, for its process and its engine core as for ours."""
    import psutil

    command = [sys.executable, "-m", "vllm.entrypoints.launchers.run_batch", "-i", str(requests),
               "-o", str(work / "peer.out.jsonl"), *vllm_flags(model)]  # fmt: skip
    env = VLLMEngine.replica_env(model, cache_dir)
    Path(env["TMPDIR"]).mkdir(parents=True, exist_ok=True)  # its IPC sockets; our replica makes it for itself
    LOG_DIR.mkdir(exist_ok=True)
    log = LOG_DIR / "vllm_run_batch.log"
    started = time.perf_counter()
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=os.environ | env, stdout=out, stderr=subprocess.STDOUT)
    progress, cpu = _GrowingLog(log), {}
    try:
        if progress.wait_for(process, re.compile(rf" 0/{n} \[")):
            engine = [p.pid for p in psutil.Process(process.pid).children(recursive=True)]
            clock = CpuClock({"run-batch (its front end)": [process.pid], "vllm engine core": engine})
            clock.start()
            if progress.wait_for(process, re.compile(rf" {n}/{n} \[")):
                cpu = clock.stop()
        returncode = process.wait()
    finally:
        progress.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    wall = time.perf_counter() - started
    if returncode != 0 or not cpu:
        raise RuntimeError(f"vllm run-batch failed ({returncode}, clocked: {bool(cpu)}); see {log}")
    rates = re.findall(rf"Completed \| {n}/{n} \[(\S+)<\S+, ([\d.]+)req/s\]", log.read_text(errors="replace"))
    answered = sum(1 for raw in (work / "peer.out.jsonl").read_text().splitlines()
                   if (json.loads(raw).get("response") or {}).get("status_code") == 200)  # fmt: skip
    return {"wall_s": round(wall, 2), "elapsed": rates[-1][0], "answered": answered, "images_s": float(rates[-1][1]),
            "cpu_ms_per_image": {name: round(1000 * s / n, 2) for name, s in cpu.items() if name != "machine busy"},
            "machine_busy": round(cpu["machine busy"], 3)}  # fmt: skip


def run(ctx: BenchContext) -> dict[str, Any]:
    model = ctx.vision_model().model_copy(update={"background_prefills": BACKGROUND_PREFILLS})
    assert batch_concurrency(model, ctx.app_config(model)) == DEFAULT_CONCURRENCY
    n = QUICK_REQUESTS if ctx.quick else REQUESTS
    with tempfile.TemporaryDirectory(prefix="nika-bench-batch-") as tmp:
        work = Path(tmp)
        requests = batch_file(model.name, n, work / "requests.jsonl")
        levels = {str(c): ours(ctx, model, requests, n, c) for c in CONCURRENCY}
        print(f"   {PEER}: {n} requests", flush=True)
        peer_result = peer(model, requests, n, ctx.app_config(model).cache_dir, work)
    default = levels[str(DEFAULT_CONCURRENCY)]
    throughput = ratio(default["images_s"], peer_result["images_s"])
    ttft = default["ttft_p50_ratio"]
    best = max(levels.values(), key=lambda level: level["images_s"])
    return {
        "comparison": f"{n} one-image requests: our Batch API vs vllm run-batch; interactive TTFT beside ours",
        "model": model.name,
        "requests": n,
        "max_tokens": MAX_TOKENS,
        "default_concurrency": DEFAULT_CONCURRENCY,
        "background_prefills": BACKGROUND_PREFILLS,
        "background_prefills_window_s": model.background_prefills_window_s,
        "systems": {OURS: {"concurrency": levels}, PEER: peer_result},
        "ratios": {
            "images_s": throughput,
            "interactive_ttft_p50_busy_over_idle": ttft,
            "best_images_s": ratio(best["images_s"], peer_result["images_s"]),
        },
        "targets": {
            f"images/s >= {TARGET_THROUGHPUT_RATIO}x vllm run-batch": throughput is not None
            and throughput >= TARGET_THROUGHPUT_RATIO,
            f"interactive TTFT p50 during a batch <= {TARGET_TTFT_RATIO}x idle": ttft is not None
            and ttft <= TARGET_TTFT_RATIO,
        },
    }
