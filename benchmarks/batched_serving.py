"""Comparison 6: continuous batching. Ours, one replica of ``parallel: 8`` (one model copy, 2 CPUs),
against llama.cpp's own ``llama-server -np 8`` on the same threads, KV layout and batch size
(built from the llama.cpp sources of our wheel, with its flags: the same kernels), against our
previous setup (2 replicas of ``parallel: 1``, two model copies, 1 CPU each) and against
``llama_cpp.server`` (one sequence at a time). Concurrency 1, 4, 8, 16; the resident memory of
each system's engine processes after its run.

On a local Ray ours is measured twice, as two apps with their own replicas (no shared prompt
caches): through the router's own port (direct ingress, ``constants.LOCAL_ENV``), which the
targets use, and through Serve's HTTP proxy, the one address a cluster has. Our two-replica
setup goes the way the targets' ours goes.

The systems the targets compare are up together and take turns at every level, two rounds
each (see :func:`interleaved_sweep`): single runs one after the other swung 10-30% with the
machine, more than the differences measured. ``llama_cpp.server`` runs alone, once.
"""

from __future__ import annotations

from typing import Any

from benchmarks.context import BenchContext, eos_token_id
from benchmarks.serving import System, interleaved_sweep, ratio, sweep
from benchmarks.systems import APP_NAME, SERVER_PIDS, llama_cpp_server, llama_server, process_tree_rss_mib
from benchmarks.workloads import SAMPLING, Workload, prompts

NAME = "batched_serving"
LEVELS = (1, 4, 8, 16)
PARALLEL = 8
OURS, PEER = f"ours (1 replica, parallel {PARALLEL})", f"llama-server -np {PARALLEL}"
OURS_PROXY = f"{OURS} via Serve's proxy"
TODAY, SERIAL = "ours (2 replicas, parallel 1)", "llama_cpp.server"
TARGETS = {  # at c=8, as the issue sets them
    "throughput_vs_llama_server": 0.95,
    "ttft_p50_vs_llama_server": 1.2,
    "throughput_vs_two_replicas": 1.3,
    "ttft_p50_vs_two_replicas": 0.25,
    "c1_throughput_vs_llama_server": 0.97,
}


def run(ctx: BenchContext) -> dict[str, Any]:
    batched = ctx.gguf_model(replicas=1, cpus=2, parallel=PARALLEL)
    two = ctx.gguf_model(replicas=2, cpus=1)
    serial = ctx.gguf_model(replicas=1, cpus=2)
    workload = Workload(batched.name, prompts(16, seed=6))
    # Model memory as the issue counts it: the weights each system loads, one copy per engine
    # process (on AVX2 llama.cpp repacks most of them, 62 of this model's 87 MiB, into private
    # buffers, so replicas do not share them). RSS, beside it, is mostly each Ray worker's runtime.
    size_mib = round(batched.path.stat().st_size / 2**20, 1)
    weights = {OURS: size_mib, OURS_PROXY: size_mib, PEER: size_mib, TODAY: 2 * size_mib, SERIAL: size_mib}
    memory: dict[str, float] = {}

    direct = ctx.ours.direct_ingress

    def ours(label: str, model: Any, app: str, via_proxy: bool = False) -> System:
        def rss(_: str) -> dict[str, Any]:
            memory[label] = process_tree_rss_mib(ctx.ours.replica_pids(model.name, app))
            info = ctx.ours.model_handle(model.name, app).info.remote().result()
            return {"engine_stats": info.engine_stats}  # one replica's: its prefix-cache hits, steps

        return System(lambda: ctx.ours.app(ctx.app_config(model), app, direct and not via_proxy), after=rss)

    def peer_rss(label: str) -> Any:
        return lambda base_url: memory.__setitem__(label, process_tree_rss_mib([SERVER_PIDS[base_url]])) or {}

    systems = interleaved_sweep(
        {
            OURS: ours(OURS, batched, APP_NAME),
            PEER: System(lambda: llama_server(batched, ctx.peer_port), after=peer_rss(PEER)),
            TODAY: ours(TODAY, two, f"{APP_NAME}-two"),
        }
        | ({OURS_PROXY: ours(OURS_PROXY, batched, f"{APP_NAME}-proxy", via_proxy=True)} if direct else {}),
        workload,
        ctx.quick,
        LEVELS,
    )
    systems[SERIAL] = sweep(
        SERIAL,
        lambda: llama_cpp_server(serial, ctx.peer_port, False),
        workload,
        ctx.quick,
        eos_token_id(serial.path),
        after=peer_rss(SERIAL),
        concurrency_levels=LEVELS,
    )
    at = {name: system["concurrency"] for name, system in systems.items()}
    ratios = {
        "throughput_vs_llama_server": ratio(at[OURS]["8"]["output_tok_s"], at[PEER]["8"]["output_tok_s"]),
        "ttft_p50_vs_llama_server": ratio(at[OURS]["8"]["ttft_ms"]["p50"], at[PEER]["8"]["ttft_ms"]["p50"]),
        "throughput_vs_two_replicas": ratio(at[OURS]["8"]["output_tok_s"], at[TODAY]["8"]["output_tok_s"]),
        "ttft_p50_vs_two_replicas": ratio(at[OURS]["8"]["ttft_ms"]["p50"], at[TODAY]["8"]["ttft_ms"]["p50"]),
        "c1_throughput_vs_llama_server": ratio(at[OURS]["1"]["output_tok_s"], at[PEER]["1"]["output_tok_s"]),
        "model_memory_vs_two_replicas": ratio(weights[OURS], weights[TODAY]),
        **(
            {
                "via_proxy_throughput_vs_llama_server": ratio(
                    at[OURS_PROXY]["8"]["output_tok_s"], at[PEER]["8"]["output_tok_s"]
                ),
                "via_proxy_ttft_p50_vs_llama_server": ratio(
                    at[OURS_PROXY]["8"]["ttft_ms"]["p50"], at[PEER]["8"]["ttft_ms"]["p50"]
                ),
                "via_proxy_c1_throughput_vs_llama_server": ratio(
                    at[OURS_PROXY]["1"]["output_tok_s"], at[PEER]["1"]["output_tok_s"]
                ),
            }
            if direct
            else {}
        ),
        "rss_vs_two_replicas": ratio(memory.get(OURS), memory.get(TODAY)),
    }
    truncated = sum(level["truncated"] + level["errors"] for level in at[OURS].values())

    def met(name: str) -> bool:
        value = ratios[name]
        higher_is_better = name.startswith(("throughput", "c1_"))
        return value is not None and (value >= TARGETS[name] if higher_is_better else value <= TARGETS[name])

    return {
        "comparison": f"Continuous batching: one llama.cpp context of {PARALLEL} sequences vs llama-server",
        "model": batched.path.name,
        "ours_via": "the router's own port (direct ingress)" if direct else "Serve's HTTP proxy",
        "settings": {
            "parallel": PARALLEL,
            "n_threads": 2,
            "kv_cache_tokens": batched.kv_cache_tokens,
            "batch_tokens": batched.batch_tokens,
            "max_tokens": workload.max_tokens,
            **SAMPLING,
        },
        "systems": systems,
        "model_memory_mib": weights,
        "memory_rss_mib": memory,
        "ratios": ratios | {"ours_truncated_or_failed": truncated},
        "targets": {
            "throughput >= 0.95 x llama-server (c=8)": met("throughput_vs_llama_server"),
            "ttft p50 <= 1.2 x llama-server (c=8)": met("ttft_p50_vs_llama_server"),
            "throughput >= 1.3 x two replicas (c=8)": met("throughput_vs_two_replicas"),
            "ttft p50 <= 0.25 x two replicas (c=8)": met("ttft_p50_vs_two_replicas"),
            "model memory <= 0.5 x two replicas": ratios["model_memory_vs_two_replicas"] <= 0.5,  # type: ignore[operator]
            "throughput >= 0.97 x llama-server (c=1)": met("c1_throughput_vs_llama_server"),
            "no request truncated": truncated == 0,
        },
    }
