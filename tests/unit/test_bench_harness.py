"""The benchmark harness's own rules: equal work per system, and how a run is summarized."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from benchmarks import gpu_engine, serving
from benchmarks.loadgen import RequestResult
from benchmarks.stats import summarize
from benchmarks.workloads import Workload, prompts
from tests.conftest import ROOT


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


def test_interleaved_systems_take_turns_and_pool_their_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int]] = []

    async def fake_load(base_url: str, payloads: list[Any], concurrency: int, label: str) -> Any:
        calls.append((base_url, concurrency))
        tokens = 2 if base_url == "a" else 1
        return [RequestResult(0, 0.1, [0.1, 0.2], 0.2, tokens) for _ in payloads], 1.0

    @contextmanager
    def up(url: str) -> Iterator[str]:
        yield url

    monkeypatch.setattr(serving, "run_load", fake_load)
    systems = {"A": serving.System(lambda: up("a")), "B": serving.System(lambda: up("b"), after=lambda u: {"x": u})}
    result = serving.interleaved_sweep(systems, Workload("m", prompts(2), max_tokens=2), True, (1, 4), rounds=2)
    warmups, runs = calls[:2], calls[2:]
    assert warmups == [("a", 1), ("b", 1)]
    assert runs == [("a", 1), ("b", 1), ("b", 1), ("a", 1), ("a", 4), ("b", 4), ("b", 4), ("a", 4)]
    level = result["A"]["concurrency"]["4"]
    assert level["requests"] == 8 and level["wall_s"] == 2.0 and level["output_tok_s"] == 8.0
    assert result["B"]["x"] == "b" and "x" not in result["A"]


def test_the_gpu_benchmark_and_its_peers_import_without_ray() -> None:
    """The GPU machine has no Ray: benchmarks.gpu_engine, and the peers it starts, must not need it."""
    code = "import sys; sys.modules['ray'] = None; import benchmarks.gpu_engine, benchmarks.systems"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_the_gpu_benchmark_states_its_targets_as_ratios_within_the_run() -> None:
    def level(rate: float, ttft_p50: float) -> dict[str, Any]:
        return {"output_tok_s": rate, "ttft_ms": {"p50": ttft_p50}}

    result = {
        "ours": {"result": {"kv_unified": False, "1": level(600, 10), "8": level(2400, 25)}},
        "batched_bench": {"result": {"streams": {"8": {"with_prefill_tok_s": 3000}}, "unified": {"skipped": "x"}}},
        "llama_server": {"result": {"8": level(1200, 40)}},
        "llama_server_backend_sampling": {"rc": -11, "result": None},
    }
    out = gpu_engine.ratios(result)
    assert out["8"] == {
        "ours_over_batched_bench_streams": 0.8,
        "ours_over_batched_bench_unified": None,
        "ours_over_llama_server": 2.0,
        "ours_over_llama_server_backend_sampling": None,
    }
    assert out["ttft_p50_c8_over_c1"] == 2.5


def test_the_cpu_clock_charges_each_group_its_own_cpu_time() -> None:
    """What batch_serving reports per image: CPU seconds by process, beside the machine's busy share."""
    import os
    import time

    from benchmarks.systems import CpuClock

    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        clock = CpuClock({"this process": [os.getpid()], "a sleeping child": [idle.pid]})
        clock.start()
        started = time.process_time()
        while time.process_time() - started < 0.3:  # burn CPU: this process's own clock, not wall time
            sum(range(10_000))
        spent = clock.stop()
    finally:
        idle.kill()
        idle.wait()
    assert spent["this process"] >= 0.25
    assert spent["a sleeping child"] < spent["this process"] / 2
    assert 0 < spent["machine busy"] <= 1


def test_a_growing_log_is_followed_until_a_pattern_or_the_process_ends(tmp_path: Path) -> None:
    """How batch_serving clocks run-batch: from its progress bar's first draw to its last step, in its log."""
    import re

    from benchmarks.batch_serving import _GrowingLog

    code = (
        "import sys; print(' 0/5 [', flush=True); sys.stdin.readline(); print(' 5/5 [', flush=True); sys.stdin.read()"
    )
    log = tmp_path / "peer.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=out)
    assert process.stdin is not None
    progress = _GrowingLog(log)
    try:
        assert progress.wait_for(process, re.compile(r" 0/5 \["))
        process.stdin.write(b"go\n")
        process.stdin.flush()
        assert progress.wait_for(process, re.compile(r" 5/5 \["))
        process.stdin.close()
        assert not progress.wait_for(process, re.compile(r" 9/9 \["))  # it ended first
    finally:
        progress.close()
        process.kill()
        process.wait()
