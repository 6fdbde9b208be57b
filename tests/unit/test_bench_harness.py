"""The benchmark harness's own rules: equal work per system, and how a run is summarized."""

from __future__ import annotations

from benchmarks.loadgen import RequestResult
from benchmarks.stats import summarize
from benchmarks.workloads import Workload, prompts


def test_every_system_gets_the_same_prompts_with_a_fixed_output_length() -> None:
    workload = Workload("m", prompts(3), max_tokens=7)
    ours, peer = workload.payloads(), workload.payloads(eos_logit_bias=2)
    assert [p["messages"] for p in ours] == [p["messages"] for p in peer]
    assert len({p["messages"][0]["content"] for p in ours}) == 3
    assert all(p["ignore_eos"] and p["max_tokens"] == 7 and p["stream"] for p in ours)
    assert all(p["logit_bias"] == {"2": -100.0} and "ignore_eos" not in p for p in peer)
    assert workload.warmup().prompts[0] not in workload.prompts


def test_a_cut_stream_counts_as_truncated_and_its_tokens_count() -> None:
    done = RequestResult(started=0, ttft=0.1, chunk_times=[0.1, 0.2, 0.3], e2e=0.3, output_tokens=3)
    cut = RequestResult(started=0, ttft=0.1, chunk_times=[0.1], output_tokens=1, error="RemoteProtocolError")
    never = RequestResult(started=0, error="HTTP 503: overloaded")
    summary = summarize([done, cut, never], wall_s=1.0, max_tokens=3)
    assert (summary["errors"], summary["truncated"], summary["output_tokens"]) == (2, 1, 4)
    assert summary["ttft_ms"]["p50"] == 100.0 and summary["tpot_ms"]["p50"] == 100.0
    assert summary["itl_ms"]["p50"] == 100.0 and summary["output_tok_s"] == 4.0
