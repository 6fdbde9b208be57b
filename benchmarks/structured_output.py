"""Comparison 7: the cost of constrained decoding. On each engine, the same model under the same
load, generating free text and generating JSON that must match a schema (``response_format``,
enforced per token: llama.cpp's grammar sampler, vLLM's structured outputs). The schema asks for
more JSON than ``max_tokens`` allows, so both runs generate exactly ``max_tokens`` tokens. The
two alternate for several rounds; the ratio is the median of the rounds' ratios.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from benchmarks.context import BenchContext
from benchmarks.serving import ratio, sweep
from benchmarks.workloads import MAX_TOKENS, SAMPLING, Workload, prompts

NAME = "structured_output"
LEVELS = (1, 4)
TARGET = 0.8  # JSON tokens/s at least this share of free text's, on each engine
WORDS = {  # 64 bounded strings: longer than max_tokens, so every answer runs to max_tokens
    "type": "object",
    "properties": {"words": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 64}},
    "required": ["words"],
    "additionalProperties": False,
}
JSON_EXTRA = {
    "response_format": {"type": "json_schema", "json_schema": {"name": "words", "schema": WORDS}},
    "ignore_eos": False,
}
ROUNDS = 3


def run(ctx: BenchContext) -> dict[str, Any]:
    gguf = ctx.gguf_model(replicas=1, cpus=2, parallel=4)
    vision = ctx.vision_model()
    systems: dict[str, Any] = {}
    rounds: dict[str, list[float | None]] = {}  # "engine c=N" -> the JSON/free ratio of each round
    for engine, model in (("llama.cpp", gguf), ("vLLM", vision)):
        with ctx.ours.app(ctx.app_config(model)) as base_url:
            # Free text and JSON back to back, several times: the machine's drift hits both alike.
            for n in range(1, ROUNDS + 1):
                workload = Workload(model.name, prompts(8, seed=7 + n))
                for label, extra in (("free text", {}), ("JSON schema", JSON_EXTRA)):
                    name = f"{engine}, {label}, round {n}"
                    systems[name] = sweep(
                        name, lambda: nullcontext(base_url), workload, ctx.quick, concurrency_levels=LEVELS, extra=extra
                    )
                for c in LEVELS:
                    rounds.setdefault(f"{engine} c={c}", []).append(
                        ratio(
                            systems[f"{engine}, JSON schema, round {n}"]["concurrency"][str(c)]["output_tok_s"],
                            systems[f"{engine}, free text, round {n}"]["concurrency"][str(c)]["output_tok_s"],
                        )
                    )
    ratios = {key: _median(values) for key, values in rounds.items()}
    return {
        "comparison": "Constrained decoding: JSON vs free text",
        "models": {"llama.cpp": gguf.path.name, "vLLM": vision.path.name},
        "settings": {"max_tokens": MAX_TOKENS, "rounds": ROUNDS, "schema": WORDS, **SAMPLING},
        "systems": systems,
        "rounds": rounds,
        "ratios": ratios,
        "targets": {
            f"{key}: JSON tokens/s >= {TARGET} x free text (median of {ROUNDS} rounds)": bool(value and value >= TARGET)
            for key, value in ratios.items()
        },
    }


def _median(values: list[float | None]) -> float | None:
    measured = sorted(v for v in values if v is not None)
    return measured[len(measured) // 2] if measured else None
