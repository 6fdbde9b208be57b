"""Guards the llama.cpp build: a bad native build segfaults on quantized models.

Each check runs in a subprocess, so a crash is a failed test rather than a dead test run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from deployments.demo_models import gguf_llama

# Two sequences batched in one context, as the replicas run them.
GENERATE = """
import asyncio, sys
from deployments.config import GGUFModelConfig
from deployments.engines.base import GenerationRequest, SamplingParams
from deployments.engines.gguf import LlamaCppEngine

async def main():
    engine = LlamaCppEngine(GGUFModelConfig(name="m", path=sys.argv[1], parallel=2, context_size=256))
    await engine.load()
    sampling = SamplingParams(temperature=0, top_p=1, top_k=0, max_tokens=16, ignore_eos=True)
    async def run(i):
        messages = ({"role": "user", "content": f"hello {i}"},)
        request = GenerationRequest(request_id=str(i), messages=messages, sampling=sampling)
        return [delta async for delta in engine.generate(request)]
    for deltas in await asyncio.gather(run(0), run(1)):
        assert deltas[-1].usage.completion_tokens == 16, deltas
        print("".join(d.text for d in deltas))
    assert engine.stats()["peak_batch_size"] == 2
    await engine.unload()

asyncio.run(main())
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
