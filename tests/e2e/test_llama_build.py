"""Guards the llama.cpp build: a bad native build segfaults on quantized models.

Each check runs in a subprocess, so a crash is a failed test rather than a dead test run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from deployments.demo_models import gguf_llama

GENERATE = """
import sys, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=256, verbose=False)
out = llm.create_completion("hello", max_tokens=16, temperature=0, logit_bias={llm.token_eos(): -1e9})
assert out["usage"]["completion_tokens"] == 16, out
print(out["choices"][0]["text"])
"""


@pytest.mark.parametrize("quantization", gguf_llama.QUANTIZED_TYPES)
def test_quantized_models_generate(models_dir: Path, quantization: str) -> None:
    path = gguf_llama.MEDIUM.path(models_dir, quantization)
    result = subprocess.run([sys.executable, "-c", GENERATE, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (
        f"generation from {path.name} failed (rc={result.returncode}): {result.stderr[-2000:]}"
    )
    assert result.stdout.strip()


def test_the_build_is_portable() -> None:
    """No AVX-512/AMX kernels: the wheel must run on every x86-64 node with AVX2."""
    info = subprocess.run(
        [sys.executable, "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "AVX2 = 1" in info
    assert "AVX512 = 1" not in info and "AMX_INT8 = 1" not in info, info
