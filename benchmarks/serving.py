"""Comparisons 2 and 3: our stack against a peer server, same workload at several concurrencies.

:func:`sweep`: each system is started alone, warmed up with one request, then driven at each
concurrency with the same prompts; only one system runs at a time. :func:`interleaved_sweep`:
the systems are up together and take turns at each level, over several rounds, so that a
machine's drift during a run (2-3x between machines, 10-30% within a run on shared cores) hits
every system alike instead of whichever ran at the time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import Any

from benchmarks.loadgen import run_load
from benchmarks.stats import summarize
from benchmarks.workloads import Workload, requests_per_level

CONCURRENCY = (1, 4, 8)


@dataclass(frozen=True)
class System:
    """A system to measure: how to start it, and what its requests need."""

    start: Callable[[], AbstractContextManager[str]]
    eos_logit_bias: int | None = None  # see :meth:`Workload.payloads`
    after: Callable[[str], dict[str, Any]] | None = None  # extra measurements once its levels ran
    extra: dict[str, Any] = field(default_factory=dict)  # fields added to every request


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
    """Start one system, run every concurrency level once (see :class:`System` for the rest)."""
    system = System(start, eos_logit_bias, after, extra or {})
    return interleaved_sweep({label: system}, workload, quick, concurrency_levels, rounds=1)[label]


def interleaved_sweep(
    systems: dict[str, System],
    workload: Workload,
    quick: bool,
    concurrency_levels: tuple[int, ...] = CONCURRENCY,
    rounds: int = 2,
) -> dict[str, dict[str, Any]]:
    """Start every system, then run each level ``rounds`` times in turn (the order reversed every
    other round); a system's summary at a level pools the requests and wall time of its rounds."""
    labels = list(systems)
    levels: dict[str, dict[str, Any]] = {label: {} for label in labels}
    extras: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack:
        urls = {label: stack.enter_context(systems[label].start()) for label in labels}
        payloads = {label: workload.payloads(s.eos_logit_bias, **s.extra) for label, s in systems.items()}
        for label, s in systems.items():
            warmup = workload.warmup().payloads(s.eos_logit_bias, **s.extra)
            asyncio.run(run_load(urls[label], warmup, 1, f"{label} warm-up"))
        for concurrency in concurrency_levels:
            n = requests_per_level(concurrency, quick)
            pooled: dict[str, tuple[list[Any], float]] = {label: ([], 0.0) for label in labels}
            for r in range(rounds):
                for label in labels if r % 2 == 0 else labels[::-1]:
                    batch = [payloads[label][i % len(payloads[label])] for i in range(n)]
                    name = f"{label} c={concurrency}" + (f" round {r + 1}/{rounds}" if rounds > 1 else "")
                    results, wall = asyncio.run(run_load(urls[label], batch, concurrency, name))
                    pooled[label] = (pooled[label][0] + results, pooled[label][1] + wall)
            for label, (results, wall) in pooled.items():
                levels[label][str(concurrency)] = summarize(results, wall, workload.max_tokens)
        for label, s in systems.items():
            extras[label] = s.after(urls[label]) if s.after is not None else {}
    return {label: {"concurrency": levels[label]} | extras[label] for label in labels}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 4)
