"""Comparison 4: deadline accuracy. A stream under a chunk deadline of 50, 100 or 200 ms is
stalled for real (the llama.cpp replica's process is stopped with SIGSTOP after a few chunks);
the client measures the time from the last content chunk to the error event.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from benchmarks.context import BenchContext
from benchmarks.systems import OurStack
from benchmarks.workloads import Workload, prompts

NAME = "deadline_accuracy"
DEADLINES_MS = (50, 100, 200)
TARGET_ERROR_MS = 50.0
CHUNKS_BEFORE_STALL = 5


async def stalled_stream(ours: OurStack, base_url: str, payload: dict[str, Any], pid: int) -> dict[str, Any]:
    """Stream until a few chunks arrived, stop the replica, time the deadline's error event."""
    last_chunk = None
    chunks = 0
    try:
        async with (
            httpx.AsyncClient(base_url=base_url, timeout=60) as client,
            client.stream("POST", "/v1/chat/completions", json=payload) as response,
        ):
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                data = json.loads(line[6:])
                if "error" in data:
                    return {"code": data["error"]["code"], "gap_ms": (now - last_chunk) * 1e3, "chunks": chunks}
                chunks += 1
                last_chunk = now
                if chunks == CHUNKS_BEFORE_STALL:
                    os.kill(pid, signal.SIGSTOP)
        return {"code": None, "gap_ms": None, "chunks": chunks}
    finally:
        os.kill(pid, signal.SIGCONT)
        await ours.wait_idle(payload["model"])


def run(ctx: BenchContext) -> dict[str, Any]:
    model = ctx.gguf_model(replicas=1)
    trials = 5 if ctx.quick else 10
    workload = Workload(model.name, prompts(1, seed=4), max_tokens=1024)
    per_deadline: dict[str, Any] = {}
    with ctx.ours.app(ctx.app_config(model)) as base_url:
        pid = ctx.ours.replica_pid(model.name)
        progress = tqdm(total=trials * len(DEADLINES_MS), desc="deadline accuracy", unit="stall", leave=False)
        for deadline_ms in DEADLINES_MS:
            (payload,) = workload.payloads(chunk_timeout_s=deadline_ms / 1e3, first_chunk_timeout_s=30)
            samples = []
            for _ in range(trials):
                samples.append(asyncio.run(stalled_stream(ctx.ours, base_url, payload, pid)))
                progress.update()
            gaps = [s["gap_ms"] for s in samples if s["code"] == "chunk_timeout"]
            errors = [abs(g - deadline_ms) for g in gaps]
            per_deadline[str(deadline_ms)] = {
                "trials": trials,
                "chunk_timeout_events": len(gaps),
                "gap_ms": [round(g, 2) for g in gaps],
                "median_gap_ms": round(float(np.median(gaps)), 2) if gaps else None,
                "max_abs_error_ms": round(max(errors), 2) if errors else None,
            }
        progress.close()
    return {
        "comparison": "chunk deadline accuracy on a stalled llama.cpp stream",
        "model": model.path.name,
        "deadlines": per_deadline,
        "targets": {
            f"{d} ms: every stall ends within 50 ms of the deadline": bool(
                r["chunk_timeout_events"] == r["trials"] and r["max_abs_error_ms"] <= TARGET_ERROR_MS
            )
            for d, r in per_deadline.items()
        },
    }
