"""Comparison 5: cancellation latency. A client disconnects mid-stream; the time until the engine
stopped is the engine's own record (``ModelInfo.idle_since``, the wall-clock time its last
generation ended) minus the wall-clock time the client closed the connection. Both clocks are
this machine's, so no poll interval enters the result.

"Engine stopped" is the engine's own event: llama.cpp's worker thread leaving its generation
loop; for vLLM, the request aborted in ``AsyncLLM`` (the engine core drops it at its next step).
One token is the median time per output token of uncancelled streams of the same request.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from benchmarks.context import BenchContext
from benchmarks.loadgen import stream_chat
from benchmarks.stats import summarize
from benchmarks.systems import OurStack
from benchmarks.workloads import Workload, image_data_url, prompts

NAME = "cancellation"
CHUNKS_BEFORE_DISCONNECT = 8
REFERENCE_TOKENS = 64


async def token_time_ms(base_url: str, payload: dict[str, Any], runs: int = 3) -> float:
    """Median time per output token (TPOT) of whole streams of ``payload``, cut to a shorter length."""
    fixed = payload | {"max_tokens": REFERENCE_TOKENS}
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        results = [await stream_chat(client, fixed) for _ in range(runs)]
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"reference stream failed: {failed[0]}")
    return summarize(results, sum(r.e2e for r in results), REFERENCE_TOKENS)["tpot_ms"]["p50"]


async def disconnect_mid_stream(ours: OurStack, base_url: str, payload: dict[str, Any]) -> float:
    """Milliseconds from the client closing its connection to the engine ending the generation."""
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
            chunks = 0
            async for line in response.aiter_lines():
                if line.startswith("data: ") and '"content"' in line:
                    chunks += 1
                    if chunks == CHUNKS_BEFORE_DISCONNECT:
                        break
        disconnected_at = time.time()  # leaving the blocks closed the connection
    await ours.wait_idle(payload["model"])
    info = await ours.model_handle(payload["model"]).info.remote()
    return (info.idle_since - disconnected_at) * 1e3


def measure(ctx: BenchContext, base_url: str, workload: Workload, trials: int, label: str) -> dict[str, Any]:
    (payload,) = workload.payloads()
    token_ms = asyncio.run(token_time_ms(base_url, payload))
    cancel = [
        asyncio.run(disconnect_mid_stream(ctx.ours, base_url, payload))
        for _ in tqdm(range(trials), desc=f"cancel {label}", unit="disconnect", leave=False)
    ]
    return {
        "trials": trials,
        "cancel_ms": [round(c, 2) for c in cancel],
        "median_cancel_ms": round(float(np.median(cancel)), 2),
        "max_cancel_ms": round(max(cancel), 2),
        "token_ms": round(token_ms, 2),
    }


def run(ctx: BenchContext) -> dict[str, Any]:
    trials = 5 if ctx.quick else 20
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
