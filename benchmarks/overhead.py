"""Comparison 1: stack overhead. Our full path (HTTP -> proxy -> router -> handle -> llama.cpp
replica) against llama-cpp-python streaming in this process, same model, prompts and settings,
one request at a time.

The two run interleaved, prompt by prompt (raw, then ours, on the same prompt, with Ray up for
both), so each pair sees the same machine: on a shared VM the speed drifts between runs by more
than the stack adds. Stream throughput is decode speed as the client sees it: tokens after the
first over the time from the first token to the last (1 / TPOT). Added TTFT is the median over
prompts of ours minus raw on the same prompt: TTFT is mostly prompt processing, which varies by
prompt length far more than the stack adds.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from benchmarks.context import BenchContext
from benchmarks.loadgen import REQUEST_TIMEOUT_S, RequestResult, stream_chat
from benchmarks.stats import summarize
from benchmarks.systems import gguf_threads
from benchmarks.workloads import SAMPLING, Workload, prompts

NAME = "overhead"
TARGET_THROUGHPUT_RATIO = 0.97
TARGET_ADDED_TTFT_MS = 5.0


class RawLlama:
    """llama-cpp-python in this process: create_chat_completion(stream=True), EOS biased away.

    It streams one chunk per token (the demo vocabulary has no partial-UTF-8 byte tokens), so
    chunks count the tokens, as for its server.
    """

    def __init__(self, model: Any, n_threads: int, seed: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=str(model.path),
            n_ctx=model.context_size,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            seed=seed,
            verbose=False,
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


async def interleaved(
    base_url: str, raw: RawLlama, workload: Workload
) -> tuple[list[RequestResult], list[RequestResult]]:
    """Each prompt on the raw engine, then through our stack; both warmed up first."""
    raw_results, ours_results = [], []
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as client:
        await asyncio.to_thread(raw.stream, workload, workload.warmup().prompts[0])
        await stream_chat(client, workload.warmup().payloads()[0])
        pairs = zip(workload.prompts, workload.payloads(), strict=True)
        for prompt, payload in tqdm(pairs, total=len(workload.prompts), desc="raw, then ours", unit="prompt"):
            raw_results.append(await asyncio.to_thread(raw.stream, workload, prompt))
            ours_results.append(await stream_chat(client, payload))
    return raw_results, ours_results


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
    with ctx.ours.app(ctx.app_config(model)) as base_url:
        raw_engine = RawLlama(model, gguf_threads(model), SAMPLING["seed"])
        try:
            raw_results, ours_results = asyncio.run(interleaved(base_url, raw_engine, workload))
        finally:
            raw_engine.close()
    # Each system's wall time is the sum of its own requests (they never overlap).
    raw, ours = (
        summarize(results, sum(r.e2e or 0.0 for r in results), workload.max_tokens)
        for results in (raw_results, ours_results)
    )
    throughput_ratio = stream_tok_s(ours) / stream_tok_s(raw)
    added_ttft_ms = paired_added_ttft_ms(raw_results, ours_results)
    return {
        "comparison": "stack overhead vs raw llama-cpp-python (concurrency 1, interleaved)",
        "model": model.path.name,
        "settings": {"n_threads": gguf_threads(model), "max_tokens": workload.max_tokens, **SAMPLING},
        "systems": {"raw llama-cpp-python": raw, "ours": ours},
        "ratios": {
            "stream_throughput_ratio": round(throughput_ratio, 4),
            "e2e_throughput_ratio": round(ours["output_tok_s"] / raw["output_tok_s"], 4),
            "added_ttft_p50_ms": round(added_ttft_ms, 3),
            "ttft_p50_difference_ms": round(ours["ttft_ms"]["p50"] - raw["ttft_ms"]["p50"], 3),
            "added_tpot_p50_ms": round(ours["tpot_ms"]["p50"] - raw["tpot_ms"]["p50"], 3),
        },
        "targets": {
            "stream_throughput_ratio >= 0.97": bool(throughput_ratio >= TARGET_THROUGHPUT_RATIO),
            "added_ttft_p50_ms <= 5": bool(added_ttft_ms <= TARGET_ADDED_TTFT_MS),
        },
        "stream_tok_s": {"raw llama-cpp-python": round(stream_tok_s(raw), 2), "ours": round(stream_tok_s(ours), 2)},
    }
