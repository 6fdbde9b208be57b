"""Comparison 7: the cost of constrained decoding. On each engine, the same model under the same
load, generating free text and generating JSON that must match a schema (``response_format``,
enforced per token: llama.cpp's grammar sampler, vLLM's structured outputs). The schema asks for
more JSON than ``max_tokens`` allows, so both runs generate exactly ``max_tokens`` tokens.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from benchmarks.context import BenchContext
from benchmarks.serving import ratio, sweep
from benchmarks.workloads import SAMPLING, Workload, prompts

NAME = "structured_output"
LEVELS = (1, 4)
TARGET = 0.8  # JSON tokens/s at least this share of free text's, on each engine
WORDS = {  # 64 bounded strings: longer than max_tokens, so every answer runs to max_tokens
    "type": "object",
    "properties": {"words": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 64}},
    "required": ["words"],
    "additionalProperties": False,
}
JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "words", "schema": WORDS}}


def run(ctx: BenchContext) -> dict[str, Any]:
    gguf = ctx.gguf_model(replicas=1, cpus=2, parallel=4)
    vision = ctx.vision_model()
    systems: dict[str, Any] = {}
    ratios: dict[str, float | None] = {}
    for engine, model in (("llama.cpp", gguf), ("vLLM", vision)):
        workload = Workload(model.name, prompts(8, seed=7))
        with ctx.ours.app(ctx.app_config(model)) as base_url:
            for label, extra in (
                ("free text", {}),
                ("JSON schema", {"response_format": JSON_FORMAT, "ignore_eos": False}),
            ):
                name = f"{engine}, {label}"
                systems[name] = sweep(
                    name, lambda: nullcontext(base_url), workload, ctx.quick, concurrency_levels=LEVELS, extra=extra
                )
        for c in LEVELS:
            ratios[f"{engine} c={c}"] = ratio(
                systems[f"{engine}, JSON schema"]["concurrency"][str(c)]["output_tok_s"],
                systems[f"{engine}, free text"]["concurrency"][str(c)]["output_tok_s"],
            )
    return {
        "comparison": "Constrained decoding: JSON-schema output vs free text, same model and load",
        "models": {"llama.cpp": gguf.path.name, "vLLM": vision.path.name},
        "settings": {"max_tokens": Workload("", ()).max_tokens, "schema": WORDS, **SAMPLING},
        "systems": systems,
        "ratios": ratios,
        "targets": {
            f"{engine}: JSON tokens/s >= {TARGET} x free text (c={c})": bool(
                ratios[f"{engine} c={c}"] and ratios[f"{engine} c={c}"] >= TARGET
            )
            for engine in ("llama.cpp", "vLLM")
            for c in LEVELS
        },
    }
