"""Our llama.cpp engine on one GPU, beside llama.cpp's own tools on the same build and model.

The GPU machine has no Ray (its wheel is over what a device call may carry), so the engine runs
in-process, as its replica runs it minus Serve: one ``LlamaCppEngine`` with ``parallel`` sequences
in one context, closed-loop streams of ``--tokens`` tokens at each concurrency. Peers in the same
run, on the same model: ``llama-batched-bench`` (the kernels alone: no sampling, no streaming)
and ``llama-server -np <parallel> -kvu`` over HTTP. The engine's own step counters split each
step into the ``llama_decode`` call and everything around it (sampling, detokenizing, emitting).

On the GPU machine (``../shared/gpu/README.md``; ``GPU_SERVER=ON`` also builds llama-server)::

    GPU_SERVER=ON bash .gpu/device.sh python3 -m benchmarks.gpu_engine --out $OUT

Here, on CPU, the same run on a demo model: ``python -m benchmarks.gpu_engine --cpu --model
models/medium-llama-Q4_K_M.gguf --levels 1 8 --out /tmp/gpu_engine``.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import os
import shutil
import subprocess
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


def llama_bin(name: str) -> Path | None:
    """A llama.cpp tool of the build llama-cpp-python loads (``LLAMA_CPP_LIB_PATH``), if built."""
    path = Path(os.environ.get("LLAMA_CPP_LIB_PATH", "/nonexistent")) / name
    return path if path.is_file() else None


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


def batched_bench(model: Path, levels: list[int], tokens: int, gpu: bool, threads: int) -> dict[str, Any] | None:
    """``llama-batched-bench``: prompt 128, ``tokens`` generated, each level as one batch."""
    tool = llama_bin("llama-batched-bench")
    if tool is None:
        return None
    command = [
        tool, "-m", model, "-c", str(max(levels) * (128 + tokens)), "-b", "2048", "-ub", "512",
        "-npp", "128", "-ntg", str(tokens), "-npl", ",".join(map(str, levels)), "-kvu",
        "-ngl", "99" if gpu else "0", "-t", str(threads), "--output-format", "jsonl",
    ]  # fmt: skip
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {
        str(r["pl"]): {
            "decode_tok_s": round(r["speed_tg"], 1),
            "prefill_tok_s": round(r["speed_pp"], 1),
        }
        for r in rows
    }


def engine_config(model: Path, parallel: int, gpu: bool, threads: int) -> GGUFModelConfig:
    return GGUFModelConfig(
        name="bench", path=model, parallel=parallel, gpu_layers=-1 if gpu else 0, n_threads=threads, seed=1234
    )


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


async def closed_loop(engine: LlamaCppEngine, sampling: SamplingParams, queue: list[str], c: int) -> dict[str, Any]:
    """``c`` streams at a time until ``queue`` is empty; throughput, TTFT and the engine's step split."""
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
    after = engine.stats()
    steps = after["steps"] - before["steps"]
    return {
        "output_tok_s": round(generated / wall, 1),
        "ttft_ms": distribution_ms(ttfts),
        "steps": steps,
        "step_ms": round(1e3 * (after["step_seconds"] - before["step_seconds"]) / steps, 3),
        "decode_ms": round(1e3 * (after["decode_seconds"] - before["decode_seconds"]) / steps, 3),
    }


async def ours(config: GGUFModelConfig, levels: list[int], tokens: int, rounds: int) -> dict[str, Any]:
    """Closed-loop streams straight on the engine: ``rounds`` x c requests at each concurrency c."""
    engine = LlamaCppEngine(config)
    await engine.load()
    sampling = SamplingParams(
        temperature=SAMPLING["temperature"], top_p=SAMPLING["top_p"], top_k=40, max_tokens=tokens, ignore_eos=True
    )
    results: dict[str, Any] = {}
    try:
        await stream(engine, sampling, "warm up")
        print(f"ours ({config.n_threads} threads): loaded, warmed up", flush=True)
        for c in levels:
            results[str(c)] = await closed_loop(engine, sampling, list(prompts(rounds * c, seed=c)), c)
            print(f"ours ({config.n_threads} threads) c={c}: {results[str(c)]}", flush=True)
    finally:
        await engine.unload()
    return results


async def llama_server(config: GGUFModelConfig, levels: list[int], tokens: int, rounds: int) -> dict[str, Any] | None:
    """llama.cpp's server with our engine's sequences, KV pool, batch and threads, over HTTP."""
    from benchmarks.systems import llama_server as server

    binary = llama_bin("llama-server") or (Path(p) if (p := os.environ.get("LLAMA_SERVER")) else None)
    if binary is None:
        return None
    os.environ["LLAMA_SERVER"] = str(binary)
    payload = {"model": config.name, "max_tokens": tokens, "ignore_eos": True, "stream": True} | SAMPLING
    results: dict[str, Any] = {}
    with server(config, PORT) as base_url:
        for c in levels:
            payloads = [payload | {"messages": [{"role": "user", "content": p}]} for p in prompts(rounds * c, seed=c)]
            runs, wall = await run_load(base_url, payloads, c, f"llama-server c={c}")
            summary = summarize(runs, wall, tokens)
            results[str(c)] = {k: summary[k] for k in ("output_tok_s", "ttft_ms", "errors")}
            print(f"llama-server c={c}: {results[str(c)]}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_engine.json")
    parser.add_argument("--model", type=Path, help="a GGUF file (default: write GPU_LLAMA to /tmp)")
    parser.add_argument("--cpu", action="store_true", help="no GPU offload")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="concurrencies")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="requests per level, per concurrent stream")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[min(8, os.cpu_count() or 1)],
        help="CPU threads (llama.cpp's and the engine's samplers'); ours runs once per value, peers with the most",
    )  # fmt: skip
    args = parser.parse_args()
    faulthandler.enable()  # a crash in llama.cpp shows the Python line that called it
    gpu = not args.cpu
    model = args.model or gpu_model(Path("/tmp/gpu-models"))
    threads = max(args.threads)
    config = engine_config(model, max(args.levels), gpu, threads)
    result: dict[str, Any] = {
        "model": model.name,
        "device": _device() if gpu else "cpu",
        "settings": {"parallel": config.parallel, "tokens": args.tokens, "threads": threads, "rounds": args.rounds},
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def record(name: str, value: Any) -> None:  # after each system: a later failure keeps the rest
        result[name] = value
        (args.out / "gpu_engine.json").write_text(json.dumps(result, indent=2) + "\n")

    record("batched_bench", batched_bench(model, args.levels, args.tokens, gpu, threads))
    print(f"llama-batched-bench: {result['batched_bench']}", flush=True)
    record("llama_server", asyncio.run(llama_server(config, args.levels, args.tokens, args.rounds)))
    for n in sorted(args.threads, reverse=True):
        name = "ours" if n == threads else f"ours_{n}_threads"
        record(
            name, asyncio.run(ours(config.model_copy(update={"n_threads": n}), args.levels, args.tokens, args.rounds))
        )


def _device() -> str:
    if shutil.which("nvidia-smi") is None:
        return "unknown GPU"
    query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
    return subprocess.run(query, capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
