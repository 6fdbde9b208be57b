"""Comparison 1: stack overhead. Our full path (HTTP -> proxy -> router -> handle -> llama.cpp
replica) against llama-cpp-python streaming in this process, same model, prompts and settings,
one request at a time.

Stream throughput is decode speed as the client sees it: tokens after the first over the time
from the first token to the last (1 / TPOT). Added TTFT is the difference of the p50s.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tqdm import tqdm

from benchmarks.context import BenchContext
from benchmarks.loadgen import RequestResult, run_load
from benchmarks.stats import summarize
from benchmarks.systems import gguf_threads
from benchmarks.workloads import SAMPLING, Workload, prompts

NAME = "overhead"
TARGET_THROUGHPUT_RATIO = 0.97
TARGET_ADDED_TTFT_MS = 5.0


def run_raw(
    model: Any, workload: Workload, n_threads: int, seed: int, progress: bool = True
) -> tuple[list[RequestResult], float]:
    """llama-cpp-python in this process: create_chat_completion(stream=True), EOS biased away.

    It streams one chunk per token (the demo vocabulary has no partial-UTF-8 byte tokens), so
    chunks count the tokens, as for its server.
    """
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(model.path),
        n_ctx=model.context_size,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        seed=seed,
        verbose=False,
    )

    def one(prompt: str) -> RequestResult:
        started = time.perf_counter()
        result = RequestResult(started=started)
        for chunk in llm.create_chat_completion(
            messages=workload.messages(prompt),
            max_tokens=workload.max_tokens,
            stream=True,
            logit_bias={llm.token_eos(): -1e9},
            **SAMPLING,
        ):
            if chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter() - started
                result.ttft = now if result.ttft is None else result.ttft
                result.chunk_times.append(now)
        result.e2e = time.perf_counter() - started
        result.output_tokens = len(result.chunk_times)
        return result

    one(workload.warmup().prompts[0])
    started = time.perf_counter()
    prompts = tqdm(workload.prompts, desc="raw llama-cpp-python", unit="req", leave=False, disable=not progress)
    results = [one(p) for p in prompts]
    wall = time.perf_counter() - started
    llm.close()
    return results, wall


def stream_tok_s(summary: dict[str, Any]) -> float:
    return 1e3 / summary["tpot_ms"]["p50"]


def run(ctx: BenchContext) -> dict[str, Any]:
    model = ctx.gguf_model(replicas=1)
    workload = Workload(model.name, prompts(8 if ctx.quick else 16, seed=1))
    raw_results, raw_wall = run_raw(model, workload, gguf_threads(model), seed=SAMPLING["seed"])
    raw = summarize(raw_results, raw_wall, workload.max_tokens)
    with ctx.ours.app(ctx.app_config(model)) as base_url:
        asyncio.run(run_load(base_url, workload.warmup().payloads(), 1, "warm-up"))
        ours = summarize(*asyncio.run(run_load(base_url, workload.payloads(), 1, "ours")), workload.max_tokens)
    throughput_ratio = stream_tok_s(ours) / stream_tok_s(raw)
    added_ttft_ms = ours["ttft_ms"]["p50"] - raw["ttft_ms"]["p50"]
    return {
        "comparison": "stack overhead vs raw llama-cpp-python (concurrency 1)",
        "model": model.path.name,
        "settings": {"n_threads": gguf_threads(model), "max_tokens": workload.max_tokens, **SAMPLING},
        "systems": {"raw llama-cpp-python": raw, "ours": ours},
        "ratios": {
            "stream_throughput_ratio": round(throughput_ratio, 4),
            "e2e_throughput_ratio": round(ours["output_tok_s"] / raw["output_tok_s"], 4),
            "added_ttft_p50_ms": round(added_ttft_ms, 3),
            "added_tpot_p50_ms": round(ours["tpot_ms"]["p50"] - raw["tpot_ms"]["p50"], 3),
        },
        "targets": {
            "stream_throughput_ratio >= 0.97": bool(throughput_ratio >= TARGET_THROUGHPUT_RATIO),
            "added_ttft_p50_ms <= 5": bool(added_ttft_ms <= TARGET_ADDED_TTFT_MS),
        },
        "stream_tok_s": {"raw llama-cpp-python": round(stream_tok_s(raw), 2), "ours": round(stream_tok_s(ours), 2)},
    }
