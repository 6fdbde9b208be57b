"""An async OpenAI-compatible streaming client: closed-loop load at a fixed concurrency.

Every request is timed at the client, chunk by chunk, the way a user sees the stream: time to
first content chunk, the gap before each later chunk, end-to-end latency. Output tokens come from
the server's ``usage`` when it streams one (``stream_options.include_usage``); llama-cpp-python's
server sends none, and sends one chunk per token, so its chunks are counted instead.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from tqdm import tqdm

REQUEST_TIMEOUT_S = 600.0


@dataclass(slots=True)
class RequestResult:
    """One streamed request as the client saw it (times in seconds from sending it)."""

    started: float
    ttft: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    e2e: float | None = None
    output_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e is not None


async def stream_chat(client: httpx.AsyncClient, payload: dict[str, Any]) -> RequestResult:
    """Send one streaming chat request and time it; errors are recorded, never raised."""
    started = time.perf_counter()
    result = RequestResult(started=started)
    usage_tokens: int | None = None
    chunks = 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    result.error = f"{data['error'].get('code')}: {data['error'].get('message')}"
                    break
                if data.get("usage"):
                    usage_tokens = data["usage"].get("completion_tokens")
                for choice in data.get("choices") or ():
                    if choice.get("delta", {}).get("content"):
                        now = time.perf_counter() - started
                        if result.ttft is None:
                            result.ttft = now
                        result.chunk_times.append(now)
                        chunks += 1
                    result.finish_reason = choice.get("finish_reason") or result.finish_reason
        result.e2e = time.perf_counter() - started
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.output_tokens = usage_tokens if usage_tokens is not None else chunks
    return result


async def run_load(
    base_url: str, payloads: Sequence[dict[str, Any]], concurrency: int, label: str
) -> tuple[list[RequestResult], float]:
    """Send ``payloads`` with ``concurrency`` requests in flight; return results and wall time."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for payload in payloads:
        queue.put_nowait(payload)
    results: list[RequestResult] = []
    # A connection per request: llama-server (cpp-httplib) closes kept-alive connections on its
    # own schedule, and a request sent on one just closed failed as "Server disconnected".
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    progress = tqdm(total=len(payloads), desc=label, unit="req", leave=False)
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                results.append(await stream_chat(client, queue.get_nowait()))
                progress.update()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    progress.close()
    return results, wall
