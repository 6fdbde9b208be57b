"""``python -m benchmarks [COMPARISON ...]``: run the comparisons, write JSON + PNG + summary."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import (
    batch_serving,
    batched_serving,
    cancellation,
    deadline_accuracy,
    gguf_serving,
    overhead,
    structured_output,
    vision_serving,
)
from benchmarks.context import BenchContext
from benchmarks.machine import describe
from benchmarks.plots import plot
from benchmarks.systems import OurStack

# `make bench` runs them in this order.
COMPARISONS = {
    m.NAME: m
    for m in (
        overhead,
        gguf_serving,
        batched_serving,
        structured_output,
        vision_serving,
        batch_serving,
        deadline_accuracy,
        cancellation,
    )
}
ROOT = Path(__file__).resolve().parent.parent


def summary_markdown(results_dir: Path) -> str:
    """The ratios and targets of every result in ``results_dir``, as a Markdown table."""
    rows = ["| comparison | ratios | targets |", "|---|---|---|"]
    for name in COMPARISONS:
        file = results_dir / f"{name}.json"
        if not file.exists():
            continue
        result = json.loads(file.read_text())
        ratios = result.get("ratios") or _headline(result)
        targets = "<br>".join(f"{'✅' if ok else '❌'} {t}" for t, ok in result["targets"].items())
        rows.append(f"| [{name}]({name}.png) | {'<br>'.join(f'{k}: {v}' for k, v in ratios.items())} | {targets} |")
    machine = json.loads((results_dir / "machine.json").read_text())
    return (
        "# Latest results\n\n"
        f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, {machine['date']}, "
        f"commit {machine['commit']}.\n\n" + "\n".join(rows) + "\n"
    )


def _headline(result: dict[str, Any]) -> dict[str, Any]:
    if "deadlines" in result:
        return {f"{d} ms: median gap": r["median_gap_ms"] for d, r in result["deadlines"].items()}
    return {
        f"{e}: median cancel / token ms": f"{r['median_cancel_ms']} / {r['token_ms']}"
        for e, r in result["engines"].items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("comparisons", nargs="*", help=f"any of {', '.join(COMPARISONS)} (default: all, in this order)")
    parser.add_argument("--quick", action="store_true", help="fewer requests per level (a smoke run)")
    parser.add_argument("--gpu", action="store_true", help="offload GGUF layers and run vLLM on one GPU each")
    parser.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")
    parser.add_argument(
        "--num-cpus", type=int, default=8, help="logical CPUs of the local Ray (what replicas reserve; not cores)"
    )
    parser.add_argument("--port", type=int, default=8100, help="our HTTP port")
    parser.add_argument("--peer-port", type=int, default=8101)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    unknown = set(args.comparisons) - set(COMPARISONS)
    if unknown:
        parser.error(f"unknown comparison(s) {', '.join(sorted(unknown))}; choose from {', '.join(COMPARISONS)}")

    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "machine.json").write_text(json.dumps(describe(), indent=2) + "\n")
    ours = OurStack(args.port, args.ray_address, args.num_cpus)
    ctx = BenchContext(args.models_dir, args.results_dir, ours, args.quick, args.gpu, args.peer_port)
    failed = []
    try:
        for name in args.comparisons or list(COMPARISONS):
            print(f"== {name}", flush=True)
            started = time.monotonic()
            try:
                result = COMPARISONS[name].run(ctx)
            except Exception:
                print(f"!! {name} failed", file=sys.stderr, flush=True)
                traceback.print_exc()
                failed.append(name)
                continue
            result["duration_s"] = round(time.monotonic() - started, 1)
            ctx.save(name, result)
            plot(name, result, args.results_dir)
            for target, ok in result["targets"].items():
                print(f"   {'met   ' if ok else 'MISSED'} {target}", flush=True)
    finally:
        ours.shutdown()
    (args.results_dir / "summary.md").write_text(summary_markdown(args.results_dir))
    print((args.results_dir / "summary.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
