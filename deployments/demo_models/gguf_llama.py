"""Deterministic random-weight llama GGUF models, written with ``gguf`` and quantized by llama.cpp.

No model can be downloaded on our machines, so the project makes its own: the weights are
random, but the file format, tokenizer, chat template, quantizer and engine are the real
ones. Every dimension that K-quants split into 256-wide super-blocks is a multiple of 256,
so ``Q4_K_M`` really is K-quants and not a silent fallback to another type.
"""

from __future__ import annotations

import ctypes
import logging
import string
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

logger = logging.getLogger(__name__)

#: Zephyr-style template; the role markers are plain text so the random model needs no special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

QUANTIZED_TYPES = ("Q8_0", "Q4_K_M")


@dataclass(frozen=True)
class LlamaSpec:
    """Shape of one generated model; ``name`` is the GGUF base name used in file names."""

    name: str
    vocab_size: int
    embedding: int
    layers: int
    heads: int
    kv_heads: int
    feed_forward: int
    context_length: int
    seed: int

    def __post_init__(self) -> None:
        for dim in (self.embedding, self.feed_forward):
            if dim % 256:
                raise ValueError(f"{self.name}: {dim} is not a multiple of 256 (K-quant super-block)")

    def path(self, directory: Path, quantization: str) -> Path:
        return directory / f"{self.name}-{quantization}.gguf"


#: Loads in milliseconds; for most tests.
TINY = LlamaSpec("tiny-llama", 512, 256, 2, 4, 2, 512, 2048, seed=1)
#: Tens of millions of parameters, tens of ms per token on 2 cores; for deadlines and benchmarks.
MEDIUM = LlamaSpec("medium-llama", 8192, 1024, 12, 16, 4, 2816, 4096, seed=2)
#: The default config's embeddings model (the same shape as TINY, other weights; mean pooling).
TINY_EMBED = LlamaSpec("tiny-embed", 512, 256, 2, 4, 2, 512, 2048, seed=3)
SPECS = {spec.name: spec for spec in (TINY, MEDIUM, TINY_EMBED)}


def _vocabulary(size: int, rng: np.random.Generator) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: control tokens, printable ASCII, pseudo-words.

    No byte-fallback tokens: a random model samples them freely, and lone bytes decode to
    invalid UTF-8 (which also stalls llama.cpp's stop-string matching). Without them every
    output decodes to clean text, and characters outside the vocabulary map to ``<unk>``.
    """
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>", "\u2581", *string.ascii_letters, *string.digits, *string.punctuation, "\n"]
    tokens += ["\u2581" + c for c in string.ascii_lowercase]
    letters = np.array(list(string.ascii_lowercase))
    seen = set(tokens)
    while len(tokens) < size:
        word = "\u2581" + "".join(rng.choice(letters, size=int(rng.integers(2, 8))))
        if word not in seen:
            seen.add(word)
            tokens.append(word)
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.NORMAL] * (size - 3)
    # Longer pieces score higher so SentencePiece merges prefer whole words.
    scores = [0.0, 0.0, 0.0] + [float(len(t)) for t in tokens[3:]]
    return tokens, scores, [int(t) for t in types]


def write_f16(spec: LlamaSpec, path: Path) -> Path:
    """Write the unquantized model: F16 matrices, F32 norms, with tokenizer and chat template."""
    rng = np.random.default_rng(spec.seed)
    head_dim = spec.embedding // spec.heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(spec.name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.embedding)
    writer.add_block_count(spec.layers)
    writer.add_feed_forward_length(spec.feed_forward)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)

    tokens, scores, types = _vocabulary(spec.vocab_size, rng)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)  # the chat template writes the BOS token itself
    writer.add_chat_template(CHAT_TEMPLATE)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)).astype(np.float16)

    def norm() -> np.ndarray:
        return np.ones(spec.embedding, dtype=np.float32)

    kv_dim = spec.kv_heads * head_dim
    writer.add_tensor("token_embd.weight", matrix(spec.vocab_size, spec.embedding))
    for i in range(spec.layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.attn_q.weight", matrix(spec.embedding, spec.embedding))
        writer.add_tensor(f"blk.{i}.attn_k.weight", matrix(kv_dim, spec.embedding))
        writer.add_tensor(f"blk.{i}.attn_v.weight", matrix(kv_dim, spec.embedding))
        writer.add_tensor(f"blk.{i}.attn_output.weight", matrix(spec.embedding, spec.embedding))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(spec.feed_forward, spec.embedding))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", matrix(spec.feed_forward, spec.embedding))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", matrix(spec.embedding, spec.feed_forward))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", matrix(spec.vocab_size, spec.embedding))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantize(source: Path, target: Path, quantization: str) -> Path:
    """Quantize with llama.cpp's own quantizer (``llama_model_quantize``)."""
    import llama_cpp

    from deployments.engines import llama_log

    llama_log.install()  # llama.cpp logs every tensor it converts: at DEBUG

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quantization}")
    params.nthread = 2
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({source.name} -> {quantization}) failed with status {status}")
    return target


def generate(spec: LlamaSpec, directory: Path, *, force: bool = False) -> list[Path]:
    """Write ``spec`` as F16 and each of :data:`QUANTIZED_TYPES`; skip files that exist."""
    directory.mkdir(parents=True, exist_ok=True)
    source = spec.path(directory, "F16")
    if force or not source.exists():
        logger.info("writing %s", source)
        write_f16(spec, source.with_suffix(".tmp"))
        source.with_suffix(".tmp").rename(source)
    written = [source]
    for quantization in QUANTIZED_TYPES:
        target = spec.path(directory, quantization)
        if force or not target.exists():
            logger.info("quantizing %s", target)
            tmp = target.with_suffix(".tmp")
            quantize(source, tmp, quantization)
            tmp.rename(target)
        written.append(target)
    return written
