"""A real llama.cpp load and generation leave the process's stdout and stderr alone.

Each case runs in a child process whose fds 1 and 2 are pipes: whatever llama.cpp, ggml or
llama-cpp-python write there (or any ``dup2`` over them) shows. The child records what reaches
the replica's logger and writes it to a file, not to the fds under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

CHILD = """
import asyncio, json, logging, os, sys

def refuse(*args):
    raise AssertionError(f"os.dup2{args}: a file descriptor of the process was redirected")

os.dup2 = refuse
records = []

class Keep(logging.Handler):
    def emit(self, record):
        records.append([record.name, record.levelname, record.getMessage()])

serve_logger = logging.getLogger("ray.serve")  # the replica's logger, as Serve configures it
serve_logger.addHandler(Keep())
serve_logger.setLevel(sys.argv[3])
serve_logger.propagate = False

from deployments.config import GGUFModelConfig
from deployments.engines.base import GenerationRequest, SamplingParams
from deployments.engines.gguf import LlamaCppEngine

async def main():
    # context_size above the model's trained 2048: llama.cpp warns about it while loading
    engine = LlamaCppEngine(GGUFModelConfig(name="m", path=sys.argv[1], context_size=4096, n_threads=1))
    await engine.load()
    sampling = SamplingParams(temperature=0, top_p=1, top_k=0, max_tokens=8, ignore_eos=True)
    request = GenerationRequest(request_id="r", messages=({"role": "user", "content": "hi"},), sampling=sampling)
    text = "".join([delta.text async for delta in engine.generate(request)])
    await engine.unload()
    return text

text = asyncio.run(main())
with open(sys.argv[2], "w") as out:
    json.dump({"text": text, "records": records}, out)
"""


def load_and_generate(models_dir: Path, tmp_path: Path, level: str) -> tuple[str, dict]:
    result = tmp_path / "result.json"
    model = models_dir / "tiny-llama-Q4_K_M.gguf"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(model), str(result), level], cwd=ROOT, capture_output=True, timeout=120
    )
    assert child.returncode == 0, child.stderr.decode(errors="replace")
    return (child.stdout + child.stderr).decode(errors="replace"), json.loads(result.read_text())


def test_a_load_writes_nothing_to_fds_1_and_2_and_llama_cpp_warnings_reach_the_logger(
    models_dir: Path, tmp_path: Path
) -> None:
    written, result = load_and_generate(models_dir, tmp_path, "INFO")
    assert written == ""
    assert result["text"]
    llama = [(level, message) for name, level, message in result["records"] if name == "ray.serve.llama_cpp"]
    assert any(level == "WARNING" and "n_ctx_train" in message for level, message in llama), llama
    assert all(level in ("WARNING", "ERROR") for level, _ in llama), llama  # its INFO and DEBUG stay out


def test_at_debug_the_logger_gets_everything_llama_cpp_says(models_dir: Path, tmp_path: Path) -> None:
    written, result = load_and_generate(models_dir, tmp_path, "DEBUG")
    assert written == ""
    llama = [(level, message) for name, level, message in result["records"] if name == "ray.serve.llama_cpp"]
    assert any(level == "DEBUG" and "n_ctx" in message for level, message in llama), llama
    assert any(level == "WARNING" for level, _ in llama)
