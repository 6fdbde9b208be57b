"""Comparison 3: vision serving. Ours (one vLLM replica behind the router) against vLLM's own
OpenAI server with the same engine arguments, on the demo VLM with one image per request.
``vllm bench serve`` then runs against both at the highest concurrency, as a second client.
Ours also runs with ``stream_interval_s: 0`` (one chunk per token, as the peer streams), which
shows what coalescing buys.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from benchmarks.context import BenchContext
from benchmarks.serving import CONCURRENCY, ratio, sweep
from benchmarks.systems import vllm_server
from benchmarks.vllm_bench import bench_serve_images
from benchmarks.workloads import SAMPLING, Workload, image_data_url, prompts

NAME = "vision_serving"
OURS, OURS_PER_TOKEN, PEER = "ours", "ours, a chunk per token", "vllm.entrypoints.openai.api_server"
TARGET_THROUGHPUT_RATIO = 0.95


def run(ctx: BenchContext) -> dict[str, Any]:
    model = ctx.vision_model()
    config = ctx.app_config(model)
    per_token = ctx.app_config(model.model_copy(update={"stream_interval_s": 0.0}))
    workload = Workload(model.name, prompts(16, words=24, seed=3), image=image_data_url())
    top = max(CONCURRENCY)
    second_client = partial(
        bench_serve_images, model=model.name, tokenizer=model.path, concurrency=top,
        num_prompts=2 * top, output_len=workload.max_tokens,
    )  # fmt: skip
    systems = {
        OURS: sweep(
            OURS, lambda: ctx.ours.app(config), workload, ctx.quick,
            after=lambda url: {"vllm_bench_serve": second_client("ours", url)},
        ),
        OURS_PER_TOKEN: sweep(OURS_PER_TOKEN, lambda: ctx.ours.app(per_token), workload, ctx.quick),
        PEER: sweep(
            PEER, lambda: vllm_server(model, ctx.peer_port, config.cache_dir), workload, ctx.quick,
            after=lambda url: {"vllm_bench_serve": second_client("peer", url)},
        ),
    }  # fmt: skip
    ratios = {
        f"throughput_c{c}": ratio(
            systems[OURS]["concurrency"][str(c)]["output_tok_s"], systems[PEER]["concurrency"][str(c)]["output_tok_s"]
        )
        for c in CONCURRENCY
    }
    ratios[f"per_token_throughput_c{top}"] = ratio(
        systems[OURS_PER_TOKEN]["concurrency"][str(top)]["output_tok_s"],
        systems[PEER]["concurrency"][str(top)]["output_tok_s"],
    )
    ratios["vllm_bench_serve_throughput"] = ratio(
        systems[OURS]["vllm_bench_serve"].get("output_throughput"),
        systems[PEER]["vllm_bench_serve"].get("output_throughput"),
    )
    return {
        "comparison": "vision serving: ours vs vLLM's OpenAI server",
        "model": model.path.name,
        "settings": {"max_tokens": workload.max_tokens, "images_per_request": 1, **SAMPLING},
        "systems": systems,
        "ratios": ratios,
        "targets": {
            f"throughput >= 0.95 x peer (c={c})": bool(
                ratios[f"throughput_c{c}"] and ratios[f"throughput_c{c}"] >= TARGET_THROUGHPUT_RATIO
            )
            for c in CONCURRENCY
        },
    }
