"""Quantization names: GGUF file types from file names and metadata.

llama.cpp's file-type enum (``general.file_type``, mirrored by ``gguf.LlamaFileType``) is
the single source of truth for the names; the file-name parser and the metadata reader
both speak it, so the two can be cross-checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import gguf

_GUESSED_FLAG = gguf.LlamaFileType.GUESSED.value


def _type_name(file_type: gguf.LlamaFileType) -> str:
    return file_type.name.removeprefix("MOSTLY_").removeprefix("ALL_")


#: Every llama.cpp GGUF file-type name (``Q4_K_M``, ``IQ2_XXS``, ``BF16``, ...) by enum value.
GGUF_FILE_TYPES: dict[int, str] = {
    t.value: _type_name(t) for t in gguf.LlamaFileType if t is not gguf.LlamaFileType.GUESSED
}

# Longest names first so ``Q4_K_M`` wins over ``Q4_K`` prefixes and ``IQ2_XXS`` over ``IQ2_XS``.
_NAME_PATTERN = re.compile(
    r"(?:^|[-._])("
    + "|".join(re.escape(n) for n in sorted(set(GGUF_FILE_TYPES.values()), key=len, reverse=True))
    + r")(?=$|[-._])",
    re.IGNORECASE,
)


def quantization_from_filename(path: str | Path) -> str | None:
    """The GGUF type named in a file name (``tiny-llama-Q4_K_M.gguf`` -> ``Q4_K_M``).

    The last match wins, because the GGUF naming convention puts the encoding after the
    base name, size label and version, which may themselves look like type names.
    """
    stem = Path(path).name.removesuffix(".gguf")
    matches = _NAME_PATTERN.findall(stem)
    return matches[-1].upper() if matches else None


def quantization_from_file_type(file_type: int) -> str | None:
    """The name of a ``general.file_type`` value, ignoring llama.cpp's "guessed" flag."""
    return GGUF_FILE_TYPES.get(file_type & ~_GUESSED_FLAG)


@dataclass(frozen=True, slots=True)
class GGUFQuantization:
    """What a GGUF file says about its quantization, and where each claim came from."""

    name: str | None
    from_filename: str | None
    from_metadata: str | None

    @property
    def disagrees(self) -> bool:
        return None not in (self.from_filename, self.from_metadata) and self.from_filename != self.from_metadata


def resolve_gguf_quantization(path: str | Path, file_type: int | None) -> GGUFQuantization:
    """Cross-check the file name against ``general.file_type``; the metadata wins."""
    from_name = quantization_from_filename(path)
    from_meta = quantization_from_file_type(file_type) if file_type is not None else None
    return GGUFQuantization(name=from_meta or from_name, from_filename=from_name, from_metadata=from_meta)


# -- in-situ quantization (ISQ) of unquantized checkpoints, for vLLM ----------------------

#: What vLLM can really quantize online, per platform, by the names users may write:
#: mistral.rs-style ISQ names and vLLM's own method names. On CPU only ``fp8_per_channel``
#: quantizes dense layers; ``int8_per_channel_weight_only`` and ``nvfp4_per_token`` load but
#: touch only MoE experts, so they are not offered (they would quantize nothing here).
ISQ_METHODS: dict[str, dict[str, str]] = {
    "cpu": {"FP8": "fp8_per_channel", "fp8_per_channel": "fp8_per_channel"},
    "cuda": {
        "FP8": "fp8",
        "fp8": "fp8",
        "fp8_per_tensor": "fp8_per_tensor",
        "fp8_per_channel": "fp8_per_channel",
        "fp8_per_block": "fp8_per_block",
        "mxfp8": "mxfp8",
    },
}


#: The lowest CUDA compute capability at which each method computes in FP8 (tensor cores of
#: Ada/Hopper, sm89+). Below it vLLM refuses per-channel scaling and falls back to weight-only
#: Marlin kernels for the rest (``online/fp8.py``): the memory saving without the speed.
ISQ_MIN_COMPUTE_CAPABILITY: dict[str, tuple[int, int]] = dict.fromkeys(ISQ_METHODS["cuda"].values(), (8, 9))

#: Compute capability of the GPUs by their Ray accelerator type (``ray.util.accelerators``
#: names, the ``accelerator_type:<name>`` resource Ray gives a GPU node).
COMPUTE_CAPABILITY: dict[str, tuple[int, int]] = {
    "V100": (7, 0),
    "T4": (7, 5),
    "A10G": (8, 6),
    "A100": (8, 0),
    "A100-40G": (8, 0),
    "A100-80G": (8, 0),
    "L4": (8, 9),
    "L40S": (8, 9),
    "H100": (9, 0),
    "H200": (9, 0),
    "B200": (10, 0),
}


def check_isq_on_gpu(method: str, accelerator_type: str) -> None:
    """Raise when ``accelerator_type`` GPUs cannot run the vLLM ISQ ``method`` at its speed.

    Unknown accelerator names pass: the rule only refuses what it knows to be impossible.
    """
    capability = COMPUTE_CAPABILITY.get(accelerator_type)
    needed = ISQ_MIN_COMPUTE_CAPABILITY.get(method)
    if capability is not None and needed is not None and capability < needed:
        have, need = ".".join(map(str, capability)), ".".join(map(str, needed))
        raise ValueError(
            f"isq {method} needs compute capability >= {need}; {accelerator_type} GPUs have {have}: "
            "drop isq, or set ray_actor_options.accelerator_type to a GPU that has it: "
            + ", ".join(name for name, have in COMPUTE_CAPABILITY.items() if have >= needed)
        )


def resolve_isq(isq: str, platform: str) -> str:
    """The vLLM online quantization method for an ISQ name on ``platform`` (``cpu``/``cuda``).

    Raises:
        ValueError: naming what this platform supports.
    """
    methods = ISQ_METHODS[platform]
    by_name = {name.lower(): method for name, method in methods.items()}
    method = by_name.get(isq.lower())
    if method is None:
        raise ValueError(f"isq {isq!r} is not supported on {platform}; supported: {', '.join(methods)}")
    return method
