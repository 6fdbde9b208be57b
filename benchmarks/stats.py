"""Summaries of a run: the same metric names and percentiles for every system."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.loadgen import RequestResult

PERCENTILES = (50, 90, 99)


def distribution_ms(values_s: Sequence[float]) -> dict[str, float] | None:
    """p50/p90/p99 and mean of ``values_s`` (seconds), in milliseconds."""
    if not values_s:
        return None
    values = np.asarray(values_s) * 1e3
    summary = {f"p{p}": round(float(np.percentile(values, p)), 3) for p in PERCENTILES}
    return summary | {"mean": round(float(values.mean()), 3)}


def summarize(results: Sequence[RequestResult], wall_s: float, max_tokens: int) -> dict[str, Any]:
    """Per-run metrics: TTFT, ITL (gap between content chunks), TPOT, e2e, tokens/s, req/s.

    Every workload fixes the output length, so a request that streamed tokens but fewer than
    ``max_tokens`` is *truncated*, whether it ended cleanly or its connection was cut (it then
    counts as an error too). Tokens/s counts every token received; latencies only complete requests.
    """
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in results)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_examples": sorted({r.error for r in results if r.error})[:3],
        "truncated": sum(1 for r in results if r.ttft is not None and r.output_tokens < max_tokens),
        "output_tokens": tokens,
        "output_tokens_per_request": sorted({r.output_tokens for r in ok}),
        "wall_s": round(wall_s, 3),
        "output_tok_s": round(tokens / wall_s, 2) if wall_s else 0.0,
        "req_s": round(len(ok) / wall_s, 3) if wall_s else 0.0,
        "ttft_ms": distribution_ms([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": distribution_ms(itl),
        "tpot_ms": distribution_ms(tpot),
        "e2e_ms": distribution_ms([r.e2e for r in ok if r.e2e is not None]),
        "chunks_per_request": round(float(np.mean([len(r.chunk_times) for r in ok])), 2) if ok else 0.0,
    }
