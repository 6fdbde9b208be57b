"""Comparison 2: GGUF serving. Ours with 2 llama.cpp replicas against ``python -m llama_cpp.server``
on the same file and threads, as it ships (``interrupt_requests`` on: a new request cuts off the
running stream) and with ``--interrupt_requests False`` (it serializes requests).

For scale, the machine's ceiling: two raw llama-cpp-python processes generating side by side
(no server, no HTTP), the most any server with two engines can get out of these cores.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Any

from tqdm import tqdm

from benchmarks.context import BenchContext, eos_token_id
from benchmarks.overhead import run_raw
from benchmarks.serving import CONCURRENCY, ratio, sweep
from benchmarks.stats import summarize
from benchmarks.systems import gguf_threads, llama_cpp_server
from benchmarks.workloads import SAMPLING, Workload, prompts

NAME = "gguf_serving"
OURS, PEER, PEER_SERIALIZED = "ours (2 replicas)", "llama_cpp.server", "llama_cpp.server --interrupt_requests False"
TARGET_THROUGHPUT_RATIO = 1.8
TARGET_TTFT_RATIO = 0.6
ENGINES = 2


def raw_ceiling(model: Any, workload: Workload) -> dict[str, Any]:
    """``ENGINES`` raw llama-cpp-python processes, each streaming its share of the prompts in turn.

    Aggregate tokens/s is the sum of the processes' own rates: they run side by side for all but
    their first model load.
    """
    shards = [replace(workload, prompts=workload.prompts[i::ENGINES]) for i in range(ENGINES)]
    with ProcessPoolExecutor(ENGINES, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_raw, model, shard, gguf_threads(model), SAMPLING["seed"]) for shard in shards]
        runs = [f.result() for f in tqdm(futures, desc=f"raw llama-cpp-python x{ENGINES}", leave=False)]
    per_process = [summarize(results, wall, workload.max_tokens) for results, wall in runs]
    return {
        "output_tok_s": round(sum(p["output_tok_s"] for p in per_process), 2),
        "tpot_ms_p50": [p["tpot_ms"]["p50"] for p in per_process],
        "processes": per_process,
    }


def run(ctx: BenchContext) -> dict[str, Any]:
    model = ctx.gguf_model(replicas=2)
    workload = Workload(model.name, prompts(16, seed=2))
    eos = eos_token_id(model.path)
    ceiling = raw_ceiling(model, workload)
    systems = {
        OURS: sweep(OURS, lambda: ctx.ours.app(ctx.app_config(model)), workload, ctx.quick),
        PEER: sweep(PEER, lambda: llama_cpp_server(model, ctx.peer_port, True), workload, ctx.quick, eos),
        PEER_SERIALIZED: sweep(
            PEER_SERIALIZED, lambda: llama_cpp_server(model, ctx.peer_port, False), workload, ctx.quick, eos
        ),
    }
    top = str(max(CONCURRENCY))
    ours, serialized = systems[OURS]["concurrency"][top], systems[PEER_SERIALIZED]["concurrency"][top]
    throughput = ratio(ours["output_tok_s"], serialized["output_tok_s"])
    ttft = ratio(ours["ttft_ms"]["p50"], serialized["ttft_ms"]["p50"])
    truncated = sum(level["truncated"] + level["errors"] for level in systems[OURS]["concurrency"].values())
    return {
        "comparison": "GGUF serving: ours (2 replicas) vs llama_cpp.server",
        "model": model.path.name,
        "settings": {"n_threads_per_engine": gguf_threads(model), "max_tokens": workload.max_tokens, **SAMPLING},
        "systems": systems,
        "ceiling": ceiling,
        "ratios": {
            f"throughput_vs_serialized_c{top}": throughput,
            f"ttft_p50_vs_serialized_c{top}": ttft,
            f"throughput_vs_default_c{top}": ratio(
                ours["output_tok_s"], systems[PEER]["concurrency"][top]["output_tok_s"]
            ),
            f"throughput_vs_ceiling_c{top}": ratio(ours["output_tok_s"], ceiling["output_tok_s"]),
            "ceiling_vs_serialized": ratio(ceiling["output_tok_s"], serialized["output_tok_s"]),
            "ours_truncated_or_failed": truncated,
            f"peer_default_cut_or_failed_c{top}": systems[PEER]["concurrency"][top]["truncated"]
            + systems[PEER]["concurrency"][top]["errors"],
        },
        "targets": {
            f"throughput >= 1.8 x serialized peer (c={top})": bool(
                throughput and throughput >= TARGET_THROUGHPUT_RATIO
            ),
            "no request truncated": truncated == 0,
            f"ttft p50 <= 0.6 x serialized peer (c={top})": bool(ttft and ttft <= TARGET_TTFT_RATIO),
        },
    }
