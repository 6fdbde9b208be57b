"""One PNG per comparison, drawn from its JSON result (``python -m benchmarks.plots`` redraws all)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS_DIR = Path(__file__).parent / "results"


def _bars(ax: Any, labels: list[str], values: list[float], title: str, unit: str) -> None:
    bars = ax.bar(labels, values, color=["#999999", "#1f77b4", "#ff7f0e", "#2ca02c"][: len(values)])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_title(title)
    ax.set_ylabel(unit)


def overhead(result: dict[str, Any], ax: list[Any]) -> None:
    systems = result["systems"]
    labels = list(systems)
    _bars(ax[0], labels, [result["stream_tok_s"][s] for s in labels], "stream throughput (1 / TPOT p50)", "tokens/s")
    _bars(ax[1], labels, [systems[s]["ttft_ms"]["p50"] for s in labels], "time to first token, p50", "ms")
    r = result["ratios"]
    proxy = "via_proxy_stream_throughput_ratio" in r
    ax[0].set_xlabel(
        f"ours {r['stream_throughput_ratio']:.3f} (target >= 0.97)"
        + (f"\nvia proxy {r['via_proxy_stream_throughput_ratio']:.3f}" if proxy else "")
    )
    ax[1].set_xlabel(
        f"added {r['added_ttft_p50_ms']:.2f} ms, median paired by prompt (target <= 5)"
        + (f"\nvia proxy {r['via_proxy_added_ttft_p50_ms']:.2f}" if proxy else "")
    )
    for a in ax[:2]:
        a.tick_params(axis="x", labelsize=7)


def _sweep(result: dict[str, Any], ax: list[Any]) -> None:
    for name, system in result["systems"].items():
        levels = system["concurrency"]
        c = [int(k) for k in levels]
        ax[0].plot(c, [levels[k]["output_tok_s"] for k in levels], marker="o", label=name)
        ax[1].plot(
            c, [levels[k]["ttft_ms"]["p50"] if levels[k]["ttft_ms"] else None for k in levels], marker="o", label=name
        )
        ax[2].plot(c, [levels[k]["truncated"] + levels[k]["errors"] for k in levels], marker="o", label=name)
    for a, (title, unit) in zip(
        ax,
        [
            ("aggregate output tokens/s", "tokens/s"),
            ("time to first token, p50", "ms"),
            ("truncated or failed", "requests"),
        ],
        strict=True,
    ):
        a.set_title(title)
        a.set_ylabel(unit)
        a.set_xlabel("concurrency")
        a.set_xticks(c)
    if "ceiling" in result:
        ax[0].axhline(result["ceiling"]["output_tok_s"], color="k", linestyle=":", label="2 raw engines (ceiling)")
    ax[0].legend(fontsize=7)


def deadline_accuracy(result: dict[str, Any], ax: list[Any]) -> None:
    for deadline, r in result["deadlines"].items():
        ax[0].scatter([int(deadline)] * len(r["gap_ms"]), r["gap_ms"], alpha=0.6)
    d = [int(k) for k in result["deadlines"]]
    ax[0].plot(d, d, "k--", label="deadline")
    ax[0].fill_between(d, [x - 50 for x in d], [x + 50 for x in d], color="green", alpha=0.1, label="±50 ms target")
    ax[0].set_title("last chunk -> error event on a stalled stream")
    ax[0].set_xlabel("chunk deadline (ms)")
    ax[0].set_ylabel("measured (ms)")
    ax[0].legend()


def cancellation(result: dict[str, Any], ax: list[Any]) -> None:
    engines = result["engines"]
    names = list(engines)
    x = range(len(names))
    ax[0].bar(
        [i - 0.2 for i in x],
        [engines[n]["median_cancel_ms"] for n in names],
        0.4,
        label="disconnect -> engine stop (p50)",
    )
    ax[0].bar([i + 0.2 for i in x], [engines[n]["token_ms"] for n in names], 0.4, label="one token (p50)")
    ax[0].set_xticks(list(x), names)
    ax[0].set_ylabel("ms")
    ax[0].set_title("cancellation latency")
    ax[0].legend()


def batched_serving(result: dict[str, Any], ax: list[Any]) -> None:
    """Throughput, TTFT and TPOT by concurrency, and each system's engine memory."""
    panels = [
        ("output_tok_s", None, "aggregate output tokens/s", "tokens/s"),
        ("ttft_ms", "p50", "time to first token, p50", "ms"),
        ("tpot_ms", "p50", "time per output token, p50", "ms"),
    ]
    names = list(result["systems"])
    for a, (key, pick, title, unit) in zip(ax, panels, strict=False):
        for i, name in enumerate(names):
            levels = result["systems"][name]["concurrency"]
            values = [levels[k][key] if pick is None else (levels[k][key] or {}).get(pick) for k in levels]
            a.plot([int(k) for k in levels], values, marker="o", color=f"C{i}", label=name)
        a.set_title(title)
        a.set_ylabel(unit)
        a.set_xlabel("concurrency")
    ax[1].set_yscale("log")  # tens of ms at c=4 and c=8 beside tens of seconds for one sequence at a time
    ax[0].legend(fontsize=7)
    memory = result["memory_rss_mib"]
    shown = [n for n in names if n in memory]
    bars = ax[3].barh(shown, [memory[n] for n in shown], color=[f"C{names.index(n)}" for n in shown])
    ax[3].bar_label(bars, fmt="%.0f")
    ax[3].invert_yaxis()
    ax[3].tick_params(axis="y", labelsize=7)
    ax[3].set_title("engine memory (RSS)")
    ax[3].set_xlabel("MiB")


def batch_serving(result: dict[str, Any], ax: list[Any]) -> None:
    """Images/s and interactive TTFT (during / idle) by the batch's concurrency, the peer's rate beside."""
    (ours_name, ours), (peer_name, peer) = result["systems"].items()
    levels = ours["concurrency"]
    c = [int(k) for k in levels]
    ax[0].plot(c, [levels[k]["images_s"] for k in levels], marker="o", label=f"{ours_name}, alone")
    ax[0].plot(c, [levels[k]["images_s_with_interactive_requests"] for k in levels], marker="o",
               label=f"{ours_name}, interactive requests beside it")  # fmt: skip
    ax[0].axhline(peer["images_s"], color="k", linestyle=":", label=peer_name)
    ax[0].set_title(f"{result['requests']} one-image requests")
    ax[0].set_ylabel("images/s")
    ax[1].plot(c, [levels[k]["ttft_p50_ratio"] for k in levels], marker="o", color="C2")
    ax[1].axhline(1.2, color="k", linestyle=":", label="target 1.2x")
    ax[1].set_title("interactive TTFT p50 during the batch / idle")
    ax[1].set_ylabel("x idle")
    columns = {str(x): levels[str(x)]["cpu_ms_per_image"] for x in c} | {peer_name: peer["cpu_ms_per_image"]}
    bottom = dict.fromkeys(columns, 0.0)
    for name in dict.fromkeys(n for processes in columns.values() for n in processes):  # each process once, in order
        shown = [column for column, processes in columns.items() if name in processes]
        ms = [columns[column][name] for column in shown]
        ax[2].bar(shown, ms, bottom=[bottom[column] for column in shown], label=name)
        for column, m in zip(shown, ms, strict=True):
            bottom[column] += m
    ax[2].tick_params(axis="x", labelsize=7)
    ax[2].set_title("CPU time per image, by process (alone)")
    ax[2].set_ylabel("ms of one core")
    ax[2].set_xlabel(f"batch.concurrency (default {result['default_concurrency']})")
    ax[2].legend(fontsize=7)
    for a in ax[:2]:
        a.set_xlabel(f"batch.concurrency (default {result['default_concurrency']})")
        a.set_xscale("log", base=2)
        a.set_xticks(c, [str(x) for x in c])
        a.legend(fontsize=7)


def structured_output(result: dict[str, Any], ax: list[Any]) -> None:
    """The JSON/free-text throughput ratio per engine and concurrency: each round, and the median."""
    keys = list(result["rounds"])
    medians = [result["ratios"][k] or 0 for k in keys]
    ax[0].bar([k.replace(" c=", "\nc=") for k in keys], medians, color="#1f77b4", alpha=0.6, label="median")
    for i, key in enumerate(keys):
        points = [r for r in result["rounds"][key] if r is not None]
        ax[0].scatter([i] * len(points), points, color="k", s=12, zorder=3, label="rounds" if i == 0 else None)
    ax[0].axhline(0.8, color="r", linestyle="--", label="target 0.8")
    ax[0].set_ylabel("JSON tokens/s / free-text tokens/s")
    ax[0].set_title("cost of constrained decoding")
    ax[0].legend(fontsize=7)


def gpu_engine(result: dict[str, Any], ax: list[Any]) -> None:
    """Tokens/s and TTFT by concurrency for every stage that ran, and where ours spent its time."""
    staged = {name: v["result"] for name, v in result.items() if isinstance(v, dict) and v.get("result")}
    bench = staged.pop("batched_bench", {})
    for i, (name, levels) in enumerate(staged.items()):
        c = [k for k in levels if k.isdigit()]
        ax[0].plot([int(k) for k in c], [levels[k]["output_tok_s"] for k in c], marker="o", color=f"C{i}", label=name)
        ttft = [(levels[k].get("ttft_ms") or {}).get("p50") for k in c]
        ax[1].plot([int(k) for k in c], ttft, marker="o", color=f"C{i}", label=name)
    for layout, style in (("unified", ":"), ("streams", "--")):
        levels = bench.get(layout) or {}
        if isinstance(levels, dict) and levels and "skipped" not in levels:
            values = [levels[k]["with_prefill_tok_s"] for k in levels]
            ax[0].plot([int(k) for k in levels], values, "k" + style, label=f"batched-bench {layout}, with prefill")
    ax[0].set_title("output tokens/s")
    ax[1].set_title("time to first token, p50")
    ax[1].set_yscale("log")
    ax[1].set_ylabel("ms")
    ax[0].legend(fontsize=6)
    ours = staged.get("ours") or {}
    c = [k for k in ours if k.isdigit()]
    parts = {"decode": [], "host (sampling, emitting)": [], "admission": [], "outside steps": []}
    for k in c:
        level = ours[k]
        in_steps, decode = level["in_steps_share"], level["decode_ms"] / max(level["step_ms"], 1e-9)
        parts["decode"].append(in_steps * decode)
        parts["host (sampling, emitting)"].append(in_steps * (1 - decode))
        parts["admission"].append(level["admit_share"])
        parts["outside steps"].append(max(0.0, 1 - in_steps - level["admit_share"]))
    bottom = [0.0] * len(c)
    for i, (label, values) in enumerate(parts.items()):
        ax[2].bar(c, values, bottom=bottom, label=label, color=f"C{i}")
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax[2].set_title("ours: share of wall time")
    ax[2].legend(fontsize=6)
    for a in ax:
        a.set_xlabel("concurrent streams")
    fig_note = result.get("device", "")
    ax[0].set_ylabel(f"tokens/s ({fig_note})" if fig_note else "tokens/s")


PLOTS = {
    "overhead": (overhead, 2),
    "gguf_serving": (_sweep, 3),
    "batched_serving": (batched_serving, 4),
    "structured_output": (structured_output, 1),
    "vision_serving": (_sweep, 3),
    "batch_serving": (batch_serving, 3),
    "deadline_accuracy": (deadline_accuracy, 1),
    "cancellation": (cancellation, 1),
    "gpu_engine": (gpu_engine, 3),
}


def plot(name: str, result: dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    draw, panels = PLOTS[name]
    fig, ax = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    draw(result, list(ax[0]))
    fig.suptitle(result["comparison"])
    fig.tight_layout()
    path = results_dir / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    for name in sys.argv[1:] or PLOTS:
        file = RESULTS_DIR / f"{name}.json"
        if file.exists():
            print(plot(name, json.loads(file.read_text())))
