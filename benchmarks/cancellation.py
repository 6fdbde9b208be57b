"""Comparison 5: cancellation latency. A client disconnects mid-stream; the time until the engine
reports no running generation is measured from outside, by polling the model replica's ``info``
through a Serve handle (its round trip bounds the resolution, and is reported).

"Engine stopped" is the engine's own count: llama.cpp's worker thread leaving its generation
loop; for vLLM, the request leaving ``AsyncLLM`` (the engine core drops it at its next step).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from benchmarks.context import BenchContext
from benchmarks.systems import OurStack
from benchmarks.workloads import Workload, image_data_url, prompts

NAME = "cancellation"
TOKENS_BEFORE_DISCONNECT = 16
STOP_TIMEOUT_S = 30


async def disconnect_mid_stream(ours: OurStack, base_url: str, payload: dict[str, Any]) -> dict[str, float]:
    handle = ours.model_handle(payload["model"])
    times: list[float] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and '"content"' in line:
                    times.append(time.perf_counter())
                    if len(times) == TOKENS_BEFORE_DISCONNECT:
                        break
        disconnected = time.perf_counter()  # leaving the blocks closed the connection
    polls = []
    while True:
        if time.perf_counter() - disconnected > STOP_TIMEOUT_S:
            raise TimeoutError(f"the engine still generates {STOP_TIMEOUT_S}s after the client disconnected")
        sent = time.perf_counter()
        info = await handle.info.remote()
        polls.append(time.perf_counter() - sent)
        if not info.active_generations:
            stopped = time.perf_counter()
            break
    await ours.wait_idle(payload["model"])
    return {
        "cancel_ms": (stopped - disconnected) * 1e3,
        "token_ms": float(np.median(np.diff(times))) * 1e3,
        "poll_rtt_ms": float(np.median(polls)) * 1e3,
    }


def measure(ctx: BenchContext, base_url: str, workload: Workload, trials: int, label: str) -> dict[str, Any]:
    (payload,) = workload.payloads()
    samples = [
        asyncio.run(disconnect_mid_stream(ctx.ours, base_url, payload))
        for _ in tqdm(range(trials), desc=f"cancel {label}", unit="disconnect", leave=False)
    ]
    cancel = [s["cancel_ms"] for s in samples]
    token = float(np.median([s["token_ms"] for s in samples]))
    return {
        "trials": trials,
        "cancel_ms": [round(c, 2) for c in cancel],
        "median_cancel_ms": round(float(np.median(cancel)), 2),
        "max_cancel_ms": round(max(cancel), 2),
        "token_ms": round(token, 2),
        "poll_rtt_ms": round(float(np.median([s["poll_rtt_ms"] for s in samples])), 2),
    }


def run(ctx: BenchContext) -> dict[str, Any]:
    trials = 5 if ctx.quick else 10
    gguf, vision = ctx.gguf_model(replicas=1), ctx.vision_model()
    engines = {}
    with ctx.ours.app(ctx.app_config(gguf, vision)) as base_url:
        text = Workload(gguf.name, prompts(1, seed=5), max_tokens=1024)
        engines["llama.cpp"] = measure(ctx, base_url, text, trials, "llama.cpp")
        images = Workload(vision.name, prompts(1, seed=5), max_tokens=2048, image=image_data_url())
        engines["vLLM"] = measure(ctx, base_url, images, trials, "vLLM")
    return {
        "comparison": "cancellation: client disconnect to engine stop",
        "models": {"llama.cpp": gguf.path.name, "vLLM": vision.path.name},
        "engines": engines,
        "targets": {
            f"{name}: median cancel <= one token time": bool(r["median_cancel_ms"] <= r["token_ms"])
            for name, r in engines.items()
        },
    }
