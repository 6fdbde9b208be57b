"""Comparison 1: stack overhead. Our full path (HTTP -> router -> handle -> llama.cpp replica; on
a local Ray through the router's own port, and again through Serve's proxy as a second app with
its own replica) against llama-cpp-python streaming in this process, same model, prompts and
settings, one request at a time. The targets use the first.

They run interleaved, prompt by prompt (raw, then ours, on the same prompt, with Ray up for
all), so each pair sees the same machine: on a shared VM the speed drifts between runs by more
than the stack adds. Stream throughput is decode speed as the client sees it: tokens after the
first over the time from the first token to the last (1 / TPOT). Added TTFT is the median over
prompts of ours minus raw on the same prompt: TTFT is mostly prompt processing, which varies by
prompt length far more than the stack adds.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import ExitStack
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from benchmarks.context import BenchContext
from benchmarks.loadgen import REQUEST_TIMEOUT_S, RequestResult, stream_chat
from benchmarks.stats import summarize
from benchmarks.systems import APP_NAME, gguf_threads
from benchmarks.workloads import SAMPLING, Workload, prompts

NAME = "overhead"
RAW, OURS, OURS_PROXY = "raw llama-cpp-python", "ours", "ours via Serve's proxy"
TARGET_THROUGHPUT_RATIO = 0.97
TARGET_ADDED_TTFT_MS = 5.0


class RawLlama:
    """llama-cpp-python in this process: create_chat_completion(stream=True), EOS biased away.

    It streams one chunk per token (the demo vocabulary has no partial-UTF-8 byte tokens), so
    chunks count the tokens, as for its server.
    """

    def __init__(self, model: Any, n_threads: int, seed: int) -> None:
        import llama_cpp

        from deployments.engines import llama_log

        llama_log.install()  # llama.cpp's log to logging; verbose=False would dup2 /dev/null over fds 1 and 2
        self.llm = llama_cpp.Llama(
            model_path=str(model.path),
            n_ctx=model.context_size,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            seed=seed,
            verbose=True,  # its Python prints (metadata, a line per request) go to stderr: the bench's log
        )

    def stream(self, workload: Workload, prompt: str) -> RequestResult:
        started = time.perf_counter()
        result = RequestResult(started=started)
        for chunk in self.llm.create_chat_completion(
            messages=workload.messages(prompt),
            max_tokens=workload.max_tokens,
            stream=True,
            logit_bias={self.llm.token_eos(): -1e9},
            **SAMPLING,
        ):
            if chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter() - started
                result.ttft = now if result.ttft is None else result.ttft
                result.chunk_times.append(now)
        result.e2e = time.perf_counter() - started
        result.output_tokens = len(result.chunk_times)
        return result

    def close(self) -> None:
        self.llm.close()


def run_raw(model: Any, workload: Workload, n_threads: int, seed: int) -> tuple[list[RequestResult], float]:
    """Every prompt of ``workload`` in turn on a raw engine, after a warm-up; results and wall time."""
    raw = RawLlama(model, n_threads, seed)
    raw.stream(workload, workload.warmup().prompts[0])
    started = time.perf_counter()
    results = [raw.stream(workload, p) for p in workload.prompts]
    wall = time.perf_counter() - started
    raw.close()
    return results, wall


async def interleaved(base_urls: dict[str, str], raw: RawLlama, workload: Workload) -> dict[str, list[RequestResult]]:
    """Each prompt on the raw engine, then through each of our URLs; all warmed up first."""
    results: dict[str, list[RequestResult]] = {RAW: [], **{label: [] for label in base_urls}}
    clients = {label: httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) for label, url in base_urls.items()}
    try:
        await asyncio.to_thread(raw.stream, workload, workload.warmup().prompts[0])
        for client in clients.values():
            await stream_chat(client, workload.warmup().payloads()[0])
        pairs = zip(workload.prompts, workload.payloads(), strict=True)
        for i, (prompt, payload) in enumerate(tqdm(pairs, total=len(workload.prompts), desc="raw, then ours")):
            results[RAW].append(await asyncio.to_thread(raw.stream, workload, prompt))
            for label in list(clients)[:: -1 if i % 2 else 1]:  # our two paths take turns going first
                results[label].append(await stream_chat(clients[label], payload))
    finally:
        for client in clients.values():
            await client.aclose()
    return results


def paired_added_ttft_ms(raw: list[RequestResult], ours: list[RequestResult]) -> float:
    """Median of ours minus raw TTFT, prompt by prompt."""
    pairs = [
        (o.ttft - r.ttft) * 1e3 for r, o in zip(raw, ours, strict=True) if r.ttft is not None and o.ttft is not None
    ]
    return float(np.median(pairs))


def stream_tok_s(summary: dict[str, Any]) -> float:
    return 1e3 / summary["tpot_ms"]["p50"]


def run(ctx: BenchContext) -> dict[str, Any]:
    model = ctx.gguf_model(replicas=1)
    workload = Workload(model.name, prompts(8 if ctx.quick else 16, seed=1))
    direct = ctx.ours.direct_ingress
    with ExitStack() as stack:
        urls = {OURS: stack.enter_context(ctx.ours.app(ctx.app_config(model), direct=direct))}
        if direct:
            urls[OURS_PROXY] = stack.enter_context(ctx.ours.app(ctx.app_config(model), f"{APP_NAME}-proxy"))
        raw_engine = RawLlama(model, gguf_threads(model), SAMPLING["seed"])
        try:
            results = asyncio.run(interleaved(urls, raw_engine, workload))
        finally:
            raw_engine.close()
    # Each system's wall time is the sum of its own requests (they never overlap).
    systems = {
        label: summarize(rs, sum(r.e2e or 0.0 for r in rs), workload.max_tokens) for label, rs in results.items()
    }
    raw = systems[RAW]

    def ratios(label: str) -> dict[str, float]:
        summary = systems[label]
        return {
            "stream_throughput_ratio": round(stream_tok_s(summary) / stream_tok_s(raw), 4),
            "e2e_throughput_ratio": round(summary["output_tok_s"] / raw["output_tok_s"], 4),
            "added_ttft_p50_ms": round(paired_added_ttft_ms(results[RAW], results[label]), 3),
            "ttft_p50_difference_ms": round(summary["ttft_ms"]["p50"] - raw["ttft_ms"]["p50"], 3),
            "added_tpot_p50_ms": round(summary["tpot_ms"]["p50"] - raw["tpot_ms"]["p50"], 3),
        }

    ours_ratios = ratios(OURS)
    return {
        "comparison": "stack overhead vs raw llama-cpp-python (concurrency 1, interleaved)",
        "model": model.path.name,
        "ours_via": "the router's own port (direct ingress)" if direct else "Serve's HTTP proxy",
        "settings": {"n_threads": gguf_threads(model), "max_tokens": workload.max_tokens, **SAMPLING},
        "systems": systems,
        "ratios": ours_ratios | ({f"via_proxy_{k}": v for k, v in ratios(OURS_PROXY).items()} if direct else {}),
        "targets": {
            "stream_throughput_ratio >= 0.97": ours_ratios["stream_throughput_ratio"] >= TARGET_THROUGHPUT_RATIO,
            "added_ttft_p50_ms <= 5": ours_ratios["added_ttft_p50_ms"] <= TARGET_ADDED_TTFT_MS,
        },
        "stream_tok_s": {label: round(stream_tok_s(summary), 2) for label, summary in systems.items()},
    }
