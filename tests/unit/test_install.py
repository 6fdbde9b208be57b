"""The CPU install: CUDA-only wheels removed, and everything the vision path imports works."""

import importlib.util
import shutil
import subprocess
import sys

import pytest

ON_GPU = (
    shutil.which("nvidia-smi") is not None and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
)


@pytest.mark.skipif(ON_GPU, reason="GPU installs keep vLLM's CUDA torchvision")
def test_cuda_only_wheels_are_not_installed_on_cpu() -> None:
    for package in ("torchvision", "torchaudio", "torchcodec"):
        assert importlib.util.find_spec(package) is None, f"{package} is installed; `make install` removes it on CPU"


def test_the_vision_stack_imports_without_torchvision() -> None:
    code = (
        "from transformers import LlamaConfig, Idefics3Processor, Idefics3ForConditionalGeneration\n"
        "import vllm.model_executor.models.idefics3\n"
        "from vllm.v1.engine.async_llm import AsyncLLM\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
