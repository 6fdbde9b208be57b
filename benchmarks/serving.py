"""Comparisons 2 and 3: our stack against a peer server, same workload at several concurrencies.

Each system is started alone, warmed up with one request, then driven at each concurrency with
the same prompts; only one system runs at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from benchmarks.loadgen import run_load
from benchmarks.stats import summarize
from benchmarks.workloads import Workload, requests_per_level

CONCURRENCY = (1, 4, 8)


def sweep(
    label: str,
    start: Callable[[], AbstractContextManager[str]],
    workload: Workload,
    quick: bool,
    eos_logit_bias: int | None = None,
    after: Callable[[str], dict[str, Any]] | None = None,
    concurrency_levels: tuple[int, ...] = CONCURRENCY,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Start one system, run every concurrency level; ``after`` runs extra measurements on it.

    ``eos_logit_bias``: see :meth:`Workload.payloads`; ``extra``: fields added to every request.
    """
    levels: dict[str, Any] = {}
    requests = workload.payloads(eos_logit_bias, **(extra or {}))
    with start() as base_url:
        warmup = workload.warmup().payloads(eos_logit_bias, **(extra or {}))
        asyncio.run(run_load(base_url, warmup, 1, f"{label} warm-up"))
        for concurrency in concurrency_levels:
            n = requests_per_level(concurrency, quick)
            batch = [requests[i % len(requests)] for i in range(n)]
            results, wall = asyncio.run(run_load(base_url, batch, concurrency, f"{label} c={concurrency}"))
            levels[str(concurrency)] = summarize(results, wall, workload.max_tokens)
        extra = after(base_url) if after is not None else {}
    return {"concurrency": levels} | extra


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 4)
