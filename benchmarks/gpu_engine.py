"""Our llama.cpp engine on one GPU, beside llama.cpp's own tools on the same build and model.

The GPU machine has no Ray (its wheel is over what a device call may carry), so the engine runs
in-process, as its replica runs it minus Serve: one ``LlamaCppEngine`` with ``parallel`` sequences
in one context, closed-loop streams of ``--tokens`` tokens at each concurrency. Peers in the same
run, on the same model and build: ``llama-batched-bench`` (the kernels alone: each level one batch,
no sampling, no streaming; its rate with prefill counts the generated tokens over prefill plus
decode) in both KV layouts, and ``llama-server`` with our sequences and layout over HTTP, with its
default sampling (on the CPU, one sequence after another) and with ``--backend-sampling``. Our
engine's own counters say where its time goes: steps (the ``llama_decode`` call and the host's
share), passes over the weights, admission and its KV copies, sampling in the graph or on the host.

Each stage runs in a subprocess of its own under the deadline, its faulthandler report in a file of
its own; ``gpu_engine.json`` is rewritten after every stage, so a crash or a cut keeps the rest.

On the GPU machine (``../shared/gpu/README.md``; ``benchmarks/gpu_engine.sh`` is the one command)::

    python3 -m benchmarks.gpu_engine --out $OUT --deadline-s 240

Here, on CPU, the same stages on a demo model (the peers where ``LLAMA_CPP_LIB_PATH`` holds them)::

    python -m benchmarks.gpu_engine --cpu --model models/medium-llama-Q4_K_M.gguf --levels 1 4 8 --out /tmp/gpu_engine

and ``python -m benchmarks.gpu_engine --plot benchmarks/results/gpu_engine.json`` draws it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import faulthandler
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.loadgen import run_load
from benchmarks.stats import distribution_ms, summarize
from benchmarks.workloads import SAMPLING, prompts
from deployments.config import GGUFModelConfig
from deployments.demo_models.gguf_llama import LlamaSpec, quantize, write_f16
from deployments.engines.base import GenerationRequest, SamplingParams
from deployments.engines.gguf import LlamaCppEngine

#: TinyLlama-1.1B's shape with random weights: the model of ../shared/gpu/README.md's table.
GPU_LLAMA = LlamaSpec("gpu-llama-1.1b", 32000, 2048, 22, 32, 4, 5632, 2048, seed=4)
QUANTIZATION = "Q4_K_M"
PORT = 8102
PROMPT_TOKENS = 128  # batched-bench's prompt; ours are chat prompts of ~70 tokens
#: Stages in order of value: what a cut-short run should have measured first. Each is ours with
#: config overrides, or a peer; the device decides which apply (``stages``).
OURS = {
    "ours": {},
    "ours_host_sampling": {"backend_sampling": False},
    "ours_backend_sampling": {"backend_sampling": True},
    "ours_unified": {"kv_unified": True},
    "ours_parallel_1": {"parallel": 1},  # one sequence per context: loads and serves there too
}
PEERS = ["batched_bench", "llama_server", "llama_server_backend_sampling"]
GPU_STAGES = ["ours", *PEERS, "ours_host_sampling", "ours_unified", "ours_parallel_1"]
CPU_STAGES = ["ours", "ours_unified", "ours_backend_sampling", *PEERS]
MIN_STAGE_S = 30  # a stage is not started with less time left


def llama_bin(name: str) -> Path | None:
    """A llama.cpp tool of the build llama-cpp-python loads (``LLAMA_CPP_LIB_PATH``, the GPU
    machine's build), or of the one ``make bench`` builds beside its ``LLAMA_SERVER``."""
    folders = [os.environ.get("LLAMA_CPP_LIB_PATH"), os.path.dirname(os.environ.get("LLAMA_SERVER", ""))]
    return next((Path(f) / name for f in folders if f and (Path(f) / name).is_file()), None)


def gpu_model(directory: Path) -> Path:
    """GPU_LLAMA in Q4_K_M, written and quantized here unless it exists."""
    target = GPU_LLAMA.path(directory, QUANTIZATION)
    if not target.exists():
        directory.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        source = write_f16(GPU_LLAMA, GPU_LLAMA.path(directory, "F16"))
        if tool := llama_bin("llama-quantize"):  # all cores, not the quantizer's 2 threads
            subprocess.run([tool, source, target, QUANTIZATION, str(os.cpu_count())], check=True, capture_output=True)
        else:
            quantize(source, target, QUANTIZATION)
        source.unlink()
        print(f"wrote {target.name} in {time.perf_counter() - started:.0f}s", flush=True)
    return target


def engine_config(model: Path, parallel: int, gpu: bool, threads: int, **overrides: Any) -> GGUFModelConfig:
    return GGUFModelConfig(
        name="bench",
        path=model,
        parallel=parallel,
        gpu_layers=-1 if gpu else 0,
        n_threads=threads,
        seed=1234,
        **overrides,
    )


# -- the stages ----------------------------------------------------------------------------


def batched_bench(config: GGUFModelConfig, levels: list[int], tokens: int, unified: bool) -> dict[str, Any]:
    """``llama-batched-bench``: a prompt of 128 and ``tokens`` generated per sequence, each level as
    one batch, in one KV layout; its decode rate, and the generated tokens over prefill plus decode."""
    tool = llama_bin("llama-batched-bench")
    if tool is None:
        return {"skipped": "llama-batched-bench is not built (LLAMA_CPP_LIB_PATH or beside LLAMA_SERVER)"}
    per_sequence = PROMPT_TOKENS + tokens
    command = [
        tool, "-m", config.path, "-c", str(max(levels) * per_sequence), "-b", str(config.batch_tokens),
        "-ub", str(config.batch_tokens), "-npp", str(PROMPT_TOKENS), "-ntg", str(tokens),
        "-npl", ",".join(map(str, levels)), *(["-kvu"] if unified else []), "-ngl", str(config.gpu_layers),
        "-t", str(config.n_threads), "--output-format", "jsonl",
    ]  # fmt: skip
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {
        str(r["pl"]): {
            "decode_tok_s": round(r["speed_tg"], 1),
            "prefill_tok_s": round(r["speed_pp"], 1),
            "with_prefill_tok_s": round(r["pl"] * r["tg"] / r["t"], 1),
        }
        for r in rows
    }


async def stream(engine: LlamaCppEngine, sampling: SamplingParams, prompt: str) -> tuple[float, int]:
    """One request on the engine: its time to first delta and the tokens it generated."""
    request = GenerationRequest(
        request_id=uuid.uuid4().hex, messages=({"role": "user", "content": prompt},), sampling=sampling
    )
    started, ttft, usage = time.perf_counter(), None, None
    async for delta in engine.generate(request):
        ttft, usage = ttft or time.perf_counter() - started, delta.usage
    assert ttft is not None and usage is not None
    return ttft, usage.completion_tokens


def where_time_went(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, Any]:
    """The engine's counters over one level: the step split, passes, admission and its copies."""
    d = {k: after[k] - before[k] for k in after if isinstance(after[k], int | float)}
    steps, admitted = max(1, int(d["steps"])), max(1, int(d["admitted"]))
    sampled = d["backend_sampled"] + d["host_sampled"]
    return {
        "steps": int(d["steps"]),
        "step_ms": round(1e3 * d["step_seconds"] / steps, 3),
        "decode_ms": round(1e3 * d["decode_seconds"] / steps, 3),
        "host_ms": round(1e3 * (d["step_seconds"] - d["decode_seconds"]) / steps, 3),
        "passes_per_step": round(d["passes"] / steps, 3),
        "in_steps_share": round(d["step_seconds"] / wall, 3),  # the rest: admission, the event loop, waits
        "admit_ms_per_admission": round(1e3 * d["admit_seconds"] / admitted, 3),
        "admit_share": round(d["admit_seconds"] / wall, 3),
        "kv_copies_per_admission": round(d["admission_kv_copies"] / admitted, 3),
        "kv_copy_ms": round(1e3 * (d["kv_save_seconds"] + d["kv_restore_seconds"]), 1),
        "kv_copy_mib": round((d["kv_save_bytes"] + d["kv_restore_bytes"]) / 2**20, 1),
        "kv_stream_copies": int(d["kv_stream_copies"]),
        "sampler_changes": int(d["sampler_changes"]),
        "backend_sampled_share": round(d["backend_sampled"] / sampled, 3) if sampled else None,
    }


async def closed_loop(engine: LlamaCppEngine, sampling: SamplingParams, queue: list[str], c: int) -> dict[str, Any]:
    """``c`` streams at a time until ``queue`` is empty; throughput, TTFT and the engine's counters."""
    ttfts: list[float] = []

    async def worker() -> int:
        generated = 0
        while queue:
            ttft, tokens = await stream(engine, sampling, queue.pop())
            ttfts.append(ttft)
            generated += tokens
        return generated

    before = engine.stats()
    started = time.perf_counter()
    generated = sum(await asyncio.gather(*(worker() for _ in range(c))))
    wall = time.perf_counter() - started
    return {
        "output_tok_s": round(generated / wall, 1),
        "ttft_ms": distribution_ms(ttfts),
        **where_time_went(before, engine.stats(), wall),
    }


async def ours(config: GGUFModelConfig, levels: list[int], tokens: int, rounds: int) -> dict[str, Any]:
    """Closed-loop streams straight on the engine: ``rounds`` x c requests at each concurrency c."""
    engine = LlamaCppEngine(config)
    await engine.load()
    sampling = SamplingParams(
        temperature=SAMPLING["temperature"], top_p=SAMPLING["top_p"], top_k=40, max_tokens=tokens, ignore_eos=True
    )
    results: dict[str, Any] = {
        "parallel": config.parallel,
        "kv_unified": config.kv_unified,
        "backend_sampling": config.backend_sampling,
    }
    try:
        await stream(engine, sampling, "warm up")
        for c in levels:
            results[str(c)] = await closed_loop(engine, sampling, list(prompts(rounds * c, seed=c)), c)
            print(f"ours c={c}: {results[str(c)]}", flush=True)
    finally:
        await engine.unload()
    return results


async def llama_server(
    config: GGUFModelConfig, levels: list[int], tokens: int, rounds: int, backend_sampling: bool
) -> dict[str, Any]:
    """llama.cpp's server with our engine's sequences, KV layout, batch and threads, over HTTP."""
    from benchmarks.systems import llama_server as server

    binary = llama_bin("llama-server")
    if binary is None:
        return {"skipped": "llama-server is not built (LLAMA_CPP_LIB_PATH or LLAMA_SERVER)"}
    os.environ["LLAMA_SERVER"] = str(binary)
    payload = {"model": config.name, "max_tokens": tokens, "ignore_eos": True, "stream": True} | SAMPLING
    results: dict[str, Any] = {}
    with server(config, PORT, backend_sampling) as base_url:
        for c in levels:
            payloads = [payload | {"messages": [{"role": "user", "content": p}]} for p in prompts(rounds * c, seed=c)]
            runs, wall = await run_load(base_url, payloads, c, f"llama-server c={c}")
            summary = summarize(runs, wall, tokens)
            results[str(c)] = {k: summary[k] for k in ("output_tok_s", "ttft_ms", "errors")}
            print(f"llama-server c={c}: {results[str(c)]}", flush=True)
    return results


def run_stage(name: str, config: GGUFModelConfig, args: argparse.Namespace) -> dict[str, Any]:
    if name in OURS:
        variant = GGUFModelConfig.model_validate(config.model_dump() | {"kv_cache_tokens": None} | OURS[name])
        levels = [c for c in args.levels if c <= variant.parallel]
        return asyncio.run(ours(variant, levels, args.tokens, args.rounds))
    if name == "batched_bench":
        return {
            "unified": batched_bench(config, args.levels, args.tokens, unified=True),
            "streams": batched_bench(config, args.levels, args.tokens, unified=False),
        }
    backend_sampling = name == "llama_server_backend_sampling"
    return asyncio.run(llama_server(config, args.levels, args.tokens, args.rounds, backend_sampling))


# -- the run -------------------------------------------------------------------------------


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each a ratio within this run (None where a stage is missing)."""

    def rate(stage: str, c: str, key: str = "output_tok_s") -> float | None:
        value = result.get(stage)
        value = value.get("result") if isinstance(value, dict) else None
        level = value.get(c) if isinstance(value, dict) else None
        return level.get(key) if isinstance(level, dict) else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    levels = [k for k in (result.get("ours", {}).get("result") or {}) if k.isdigit()]
    bench = (result.get("batched_bench") or {}).get("result") or {}

    def bench_rate(layout: str, c: str) -> float | None:
        return ((bench.get(layout) or {}).get(c) or {}).get("with_prefill_tok_s")

    out: dict[str, Any] = {}
    for c in levels:
        ours_rate = rate("ours", c)
        out[c] = {
            "ours_over_batched_bench_streams": ratio(ours_rate, bench_rate("streams", c)),
            "ours_over_batched_bench_unified": ratio(ours_rate, bench_rate("unified", c)),
            "ours_over_llama_server": ratio(ours_rate, rate("llama_server", c)),
            "ours_over_llama_server_backend_sampling": ratio(ours_rate, rate("llama_server_backend_sampling", c)),
        }
    ttft = {c: (rate("ours", c, "ttft_ms") or {}).get("p50") for c in levels}
    if "1" in ttft and "8" in ttft:
        out["ttft_p50_c8_over_c1"] = ratio(ttft["8"], ttft["1"])
    return out


def orchestrate(args: argparse.Namespace) -> None:
    """Every stage in a subprocess under the deadline; the JSON rewritten after each."""
    deadline = time.time() + args.deadline_s
    gpu = not args.cpu
    model = args.model or gpu_model(Path("/tmp/gpu-models"))
    config = engine_config(model, max(args.levels), gpu, args.threads)
    device = _device() if gpu else "cpu"
    result: dict[str, Any] = {
        "comparison": f"our llama.cpp engine beside batched-bench and llama-server, one build and model: {device}",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device,
        "model": model.name,
        "settings": {
            "parallel": config.parallel,
            "levels": args.levels,
            "tokens": args.tokens,
            "rounds": args.rounds,
            "threads": args.threads,
            "kv_unified": config.kv_unified,
            "batch_tokens": config.batch_tokens,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_engine.json"
    for name in args.stages or (GPU_STAGES if gpu else CPU_STAGES):
        left = deadline - time.time()
        if left < MIN_STAGE_S:
            result[name] = {"skipped": f"deadline ({left:.0f}s left)"}
        else:
            result[name] = _subprocess_stage(name, model, args, left)
        result["ratios"] = ratios(result)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"== {name}: {json.dumps(result[name])[:2000]}", flush=True)
    print(f"== ratios: {json.dumps(result['ratios'])}", flush=True)


def _subprocess_stage(name: str, model: Path, args: argparse.Namespace, left: float) -> dict[str, Any]:
    """One stage in its own process: a crash or a hang there costs that stage only."""
    command = [sys.executable, "-m", "benchmarks.gpu_engine", "--stage", name, "--model", str(model)]
    command += ["--out", str(args.out), "--levels", *map(str, args.levels), "--tokens", str(args.tokens)]
    command += ["--rounds", str(args.rounds), "--threads", str(args.threads), *(["--cpu"] if args.cpu else [])]
    started = time.time()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=left - 5)
        rc, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        parts = [p.encode() if isinstance(p, str) else p for p in (exc.stdout, exc.stderr) if p]
        rc, text = "timeout", b"".join(parts).decode(errors="replace")
    (args.out / f"{name}.log").write_text(text)
    found = [json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")]
    stage: dict[str, Any] = {"rc": rc, "seconds": round(time.time() - started, 1)}
    stage["result"] = found[0] if found else None
    if not found:
        stage["tail"] = text[-3000:]
    return stage


def stage_main(args: argparse.Namespace) -> None:
    """One stage, in this process: its result as one ``RESULT <json>`` line."""
    args.out.mkdir(parents=True, exist_ok=True)
    # A file of its own: llama.cpp must not be able to silence it (see deployments.engines.llama_log).
    faulthandler.enable(file=(args.out / f"{args.stage}.faulthandler").open("w"), all_threads=True)
    config = engine_config(args.model, max(args.levels), not args.cpu, args.threads)
    print("RESULT " + json.dumps(run_stage(args.stage, config, args)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for gpu_engine.json, each stage's log and faulthandler file")
    parser.add_argument("--model", type=Path, help="a GGUF file (default: write GPU_LLAMA to /tmp/gpu-models)")
    parser.add_argument("--cpu", action="store_true", help="no GPU offload")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64], help="concurrencies")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="requests per level, per concurrent stream")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="CPU threads")
    parser.add_argument("--stages", nargs="+", choices=[*OURS, *PEERS], help="default: all that apply to the device")
    parser.add_argument("--deadline-s", type=float, default=480, help="no stage starts after this (seconds)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # one stage, run by the orchestrator
    parser.add_argument("--plot", type=Path, help="draw this gpu_engine.json as a PNG beside it, and stop")
    args = parser.parse_args()
    if args.plot:
        from benchmarks.plots import plot

        print(plot("gpu_engine", json.loads(args.plot.read_text()), args.plot.parent))
    elif args.stage:
        stage_main(args)
    elif args.out is None:
        parser.error("--out is required")
    else:
        orchestrate(args)


def _device() -> str:
    if shutil.which("nvidia-smi") is None:
        return "unknown GPU"
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    return subprocess.run(query, capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
