from pathlib import Path

import gguf
import pytest

from deployments.demo_models import gguf_llama
from deployments.engines.gguf import read_gguf_facts
from deployments.quantization import (
    GGUF_FILE_TYPES,
    quantization_from_file_type,
    quantization_from_filename,
    resolve_gguf_quantization,
    resolve_isq,
)


@pytest.mark.parametrize("name", sorted(set(GGUF_FILE_TYPES.values())))
def test_every_llama_cpp_type_name_parses_from_a_file_name(name: str) -> None:
    assert quantization_from_filename(f"Some-Model-7B-Instruct-v0.2-{name}.gguf") == name
    assert quantization_from_filename(f"some-model.{name.lower()}.gguf") == name


@pytest.mark.parametrize(
    ("file_name", "expected"),
    [
        ("tiny-llama-Q4_K_M.gguf", "Q4_K_M"),
        ("Mistral-7B-Instruct-v0.3-Q5_K_S.gguf", "Q5_K_S"),
        ("model-IQ2_XXS.gguf", "IQ2_XXS"),  # not IQ2_XS
        ("model-IQ2_XS.gguf", "IQ2_XS"),
        ("model-Q4_K_S-00001-of-00002.gguf", "Q4_K_S"),  # shard suffix after the type
        ("llama-3-8b.BF16.gguf", "BF16"),
        ("model-F16.gguf", "F16"),
        ("model-Q4_0.gguf", "Q4_0"),
        ("model.gguf", None),
        ("Q4_K_Maximal-model.gguf", None),  # a type name must stand alone between separators
    ],
)
def test_file_name_cases(file_name: str, expected: str | None) -> None:
    assert quantization_from_filename(file_name) == expected


def test_every_file_type_value_has_a_name_and_the_guessed_flag_is_ignored() -> None:
    for file_type in gguf.LlamaFileType:
        if file_type is gguf.LlamaFileType.GUESSED:
            continue
        name = quantization_from_file_type(file_type.value)
        assert name is not None and name in file_type.name
        assert quantization_from_file_type(file_type.value | gguf.LlamaFileType.GUESSED.value) == name
    assert quantization_from_file_type(9999) is None


def test_metadata_wins_when_the_file_name_disagrees() -> None:
    resolved = resolve_gguf_quantization("renamed-Q8_0.gguf", gguf.LlamaFileType.MOSTLY_Q4_K_M.value)
    assert resolved.name == "Q4_K_M"
    assert resolved.disagrees
    assert resolve_gguf_quantization("model-Q8_0.gguf", None).name == "Q8_0"


@pytest.mark.parametrize("quantization", ["F16", *gguf_llama.QUANTIZED_TYPES])
def test_generated_files_carry_the_type_in_name_and_metadata(models_dir: Path, quantization: str) -> None:
    path = gguf_llama.TINY.path(models_dir, quantization)
    facts = read_gguf_facts(path)
    assert facts.quantization == quantization
    assert facts.size_bytes == path.stat().st_size
    assert facts.trained_context_length == gguf_llama.TINY.context_length


def test_renamed_file_reports_the_metadata_type(models_dir: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "tiny-llama-Q8_0.gguf"
    renamed.symlink_to(gguf_llama.TINY.path(models_dir, "Q4_K_M"))
    assert read_gguf_facts(renamed).quantization == "Q4_K_M"


@pytest.mark.parametrize(
    ("isq", "platform", "method"),
    [
        ("FP8", "cpu", "fp8_per_channel"),
        ("fp8", "cpu", "fp8_per_channel"),
        ("FP8", "cuda", "fp8"),
        ("fp8_per_block", "cuda", "fp8_per_block"),
    ],
)
def test_isq_names_map_to_what_vllm_really_does(isq: str, platform: str, method: str) -> None:
    assert resolve_isq(isq, platform) == method


@pytest.mark.parametrize("isq", ["Q4K", "Q8_0", "int8_per_channel_weight_only", "nvfp4_per_token", "bogus"])
def test_isq_that_would_not_quantize_a_dense_model_on_cpu_is_refused(isq: str) -> None:
    with pytest.raises(ValueError, match="supported: FP8, fp8_per_channel"):
        resolve_isq(isq, "cpu")
