"""llama.cpp engine: a local GGUF file on llama-cpp-python's low-level API, continuously batched.

Up to ``parallel`` requests run together in one llama.cpp context (one copy of the model; a KV
stream per sequence, or one shared pool) under the scheduler in ``engines.llama_scheduler``, which
owns the context on its own thread. The event loop only tokenizes, submits, and relays each sequence's deltas; a
cancelled or disconnected request leaves the batch at the next step and frees its KV cells.
``parallel: 1`` runs the same code one request at a time.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from deployments.config import GGUFModelConfig
from deployments.engines import llama_log
from deployments.engines.base import Delta, Embeddings, Engine, GenerationRequest, ModelFacts, Prompt
from deployments.engines.llama_embedding import POOLING, SEQUENCES_PER_BATCH, Embedder
from deployments.engines.llama_sampling import RANDOM_SEED, Samplers
from deployments.engines.llama_scheduler import END, Scheduler, Sequence
from deployments.errors import InvalidRequest, ModelLoadFailed, ModelNotLoaded
from deployments.quantization import resolve_gguf_quantization
from deployments.tools import template_input

logger = logging.getLogger("ray.serve")

SPLIT_MODES = {"none": 0, "layer": 1, "row": 2}  # llama.h's enum llama_split_mode

# Beyond the sequences it runs, a replica takes this many more requests: control calls (info,
# reconfigure) reach it while it generates, and the next request is ready the moment a slot frees.
SPARE_ONGOING_REQUESTS = 3


@dataclass(frozen=True, slots=True)
class GGUFFacts:
    """What the file itself says, read from its header without loading the weights."""

    size_bytes: int
    quantization: str | None
    trained_context_length: int | None
    tensor_types: dict[str, int]


def _read_facts(path: Path) -> GGUFFacts:
    try:
        return read_gguf_facts(path)
    except Exception as exc:  # gguf's reader raises many types for a damaged file
        raise ModelLoadFailed(f"{path.name} is not a readable GGUF file: {type(exc).__name__}: {exc}") from exc


def read_gguf_facts(path: Path) -> GGUFFacts:
    reader = gguf.GGUFReader(path)

    def scalar(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    arch = scalar(gguf.Keys.General.ARCHITECTURE)
    context = scalar(gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=arch)) if arch else None
    quantization = resolve_gguf_quantization(path, scalar(gguf.Keys.General.FILE_TYPE))
    types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    return GGUFFacts(path.stat().st_size, quantization.name, context, dict(types))


def _assigned_cpus() -> int:
    """The CPUs Ray gave this replica: llama.cpp's own default (all cores / 2) ignores them."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1) if ray.is_initialized() else 1
    return max(1, int(cpus))


def llama_model_params(llama_cpp: Any, config: GGUFModelConfig) -> Any:
    """llama.cpp's model parameters: the layers to offload and how they split over the replica's
    GPUs (the ones Ray made visible to it, numbered from 0)."""
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0x7FFFFFFF if config.gpu_layers == -1 else config.gpu_layers
    params.split_mode = SPLIT_MODES[config.split_mode or "none"]
    params.main_gpu = config.main_gpu
    if config.tensor_split:  # ctypes keeps the array alive with the struct that points at it
        params.tensor_split = (ctypes.c_float * llama_cpp.llama_max_devices())(*config.tensor_split)
    return params


class LlamaCppEngine(Engine):
    kind = "gguf"
    config: GGUFModelConfig

    @classmethod
    def describe(cls, config: GGUFModelConfig) -> ModelFacts:
        facts = _read_facts(config.path)
        return ModelFacts(config.path.stem, facts.size_bytes, facts.quantization)

    @classmethod
    def max_ongoing_requests(cls, config: GGUFModelConfig) -> int:
        return config.parallel + SPARE_ONGOING_REQUESTS

    @classmethod
    def target_ongoing_requests(cls, config: GGUFModelConfig) -> int:
        return config.parallel

    def __init__(self, config: GGUFModelConfig) -> None:
        super().__init__(config)
        self._model: Any = None  # llama_cpp._internals.LlamaModel
        self._context: Any = None  # llama_cpp._internals.LlamaContext
        self._formatter: Any = None
        self._scheduler: Scheduler | None = None
        self._embedder: Embedder | None = None  # instead of the scheduler: config.embeddings
        self._active = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def load(self) -> None:
        await asyncio.to_thread(self._load_blocking)

    def _load_blocking(self) -> None:
        import llama_cpp
        from llama_cpp._internals import LlamaContext, LlamaModel
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        llama_log.install()
        cfg = self.config
        model_params = llama_model_params(llama_cpp, cfg)
        try:  # verbose=False would dup2 /dev/null over fds 1 and 2 (engines.llama_log says why not)
            model = LlamaModel(path_model=str(cfg.path), params=model_params, verbose=True)
        except ValueError as exc:  # llama-cpp-python's only signal for a file it cannot load
            raise ModelLoadFailed(f"failed to load {cfg.path.name}: {exc}") from exc
        template = model.metadata().get("tokenizer.chat_template")
        if template is None and not cfg.embeddings:
            model.close()
            raise ModelLoadFailed(f"{cfg.path.name} has no tokenizer.chat_template")
        # Prompt processing too: llama.cpp's default there is every core of the node, which
        # oversubscribes the CPUs when replicas share a node, and its spinning thread barriers
        # then stall (measured: 2 replicas on 2 cores ran no faster than 1).
        threads = cfg.n_threads or _assigned_cpus()
        params = llama_cpp.llama_context_default_params()
        params.n_threads = params.n_threads_batch = threads
        if cfg.embeddings:  # inputs of up to context_size tokens, several per batch, in one pool
            params.n_ctx = params.n_batch = params.n_ubatch = cfg.context_size
            params.n_seq_max = SEQUENCES_PER_BATCH
            params.kv_unified = True
            params.embeddings = True
            params.pooling_type = POOLING[cfg.pooling]
        else:
            params.kv_unified = cfg.kv_unified
            # A stream per sequence holds n_ctx / n_seq_max cells, which llama.cpp rounds up to 256.
            per_sequence = -(-cfg.kv_cache_tokens // cfg.parallel // 256) * 256
            params.n_ctx = cfg.kv_cache_tokens if cfg.kv_unified else per_sequence * cfg.parallel
            params.n_batch = params.n_ubatch = cfg.batch_tokens
            params.n_seq_max = cfg.parallel
            # The scheduler samples at most one output per sequence a step: logits (and backend
            # sampling's buffers) for `parallel` outputs instead of n_batch; penalties can then
            # run in the graph, and the graph's dist sampler needs no draw bookkeeping.
            params.n_outputs_max = cfg.parallel
            params.n_outputs_max_per_seq = 1
        try:
            context = LlamaContext(model=model, params=params)
        except ValueError as exc:
            model.close()
            raise ModelLoadFailed(f"llama.cpp could not create a context for {cfg.path.name}: {exc}") from exc
        self._model, self._context = model, context
        if cfg.embeddings:
            self._embedder = Embedder(llama_cpp, context.ctx, model.model, cfg.context_size)
            return
        self._formatter = Jinja2ChatFormatter(
            template=template,
            bos_token=model.token_get_text(model.token_bos()),
            eos_token=model.token_get_text(model.token_eos()),
        )
        backend_sampling = cfg.backend_sampling
        if backend_sampling is None:
            backend_sampling = bool(cfg.gpu_layers) and llama_cpp.llama_supports_gpu_offload()
        self._scheduler = Scheduler(
            llama_cpp,
            context.ctx,
            model.vocab,
            parallel=cfg.parallel,
            n_batch=cfg.batch_tokens,
            kv_cells=llama_cpp.llama_n_ctx(context.ctx),
            prompt_cache_bytes=cfg.prompt_cache_mib * 2**20,
            threads=threads,
            streams=not cfg.kv_unified,
            backend_sampling=backend_sampling,
        )

    async def unload(self) -> None:
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:  # running streams end without a final delta: the replica says why
            await asyncio.to_thread(scheduler.stop)
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        if self._context is not None:
            self._context.close()
            self._model.close()
            self._model = self._context = self._formatter = None

    def active_generations(self) -> int:
        return self._active

    def stats(self) -> dict[str, float]:
        """The scheduler's counters and ``parallel`` (the sequences one context runs at once)."""
        stats = self._scheduler.stats.as_dict() if self._scheduler else {}
        return {"parallel": self.config.parallel, **stats}

    async def check_health(self, timeout_s: float) -> None:
        if self._scheduler is not None and not self._scheduler.alive:
            raise RuntimeError(f"the llama.cpp scheduler of model {self.config.name} has stopped")

    async def layer_types(self) -> dict[str, int]:
        """GGUF tensor types (``Q4_K``, ``Q6_K``, ``F32``, ...) as the file stores them."""
        return (await asyncio.to_thread(_read_facts, self.config.path)).tensor_types

    # -- generation --------------------------------------------------------------------

    def _tokens(self, prompt: Prompt, add_special: bool = True) -> list[int]:
        model = self._model
        if model is None:
            raise ModelNotLoaded(f"model {self.config.name} is not loaded")
        if prompt.prompt is not None:  # a text completion: the text as it is, after BOS
            text, add_bos = prompt.prompt, add_special
        elif self._formatter is None:
            raise InvalidRequest(f"model {self.config.name} serves embeddings: it has no chat template, send a prompt")
        else:
            messages, tools = template_input(prompt.messages, prompt.tools, self._formatter.template)
            try:
                rendered = self._formatter(messages=messages, tools=tools)
            except Exception as exc:  # the template's raise_exception, or a Jinja error on these messages
                raise InvalidRequest(f"the messages do not fit the model's chat template: {exc}") from None
            text, add_bos = rendered.prompt, not rendered.added_special
        return model.tokenize(text.encode(), add_bos=add_bos, special=True)

    async def tokenize(self, prompt: Prompt, add_special: bool = True) -> list[int]:
        return self._tokens(prompt, add_special)

    async def detokenize(self, tokens: list[int]) -> str:
        import llama_cpp

        model = self._model
        if model is None:
            raise ModelNotLoaded(f"model {self.config.name} is not loaded")
        if bad := sorted({t for t in tokens if not 0 <= t < model.n_vocab()}):
            raise InvalidRequest(f"tokens {bad[:8]} are not in the vocabulary (0..{model.n_vocab() - 1})")
        ids = (llama_cpp.llama_token * len(tokens))(*tokens)
        size = 16 + 8 * len(tokens)
        while True:
            buffer = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_detokenize(model.vocab, ids, len(tokens), buffer, size, False, True)
            if n >= 0:
                return buffer.raw[:n].decode("utf-8", errors="replace")
            size = -n  # too small: llama.cpp says how long the text is

    def _prompt_tokens(self, request: GenerationRequest) -> list[int]:
        tokens = self._tokens(request)
        max_tokens = request.sampling.max_tokens
        if not tokens or len(tokens) + max_tokens > self.config.context_size:
            raise InvalidRequest(
                f"the prompt has {len(tokens)} tokens; with max_tokens={max_tokens} it exceeds the context "
                f"of {self.config.context_size} tokens of model {self.config.name}; "
                "shorten the messages or lower max_tokens",
                code="context_length_exceeded",
            )
        return tokens

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        scheduler = self._scheduler
        if scheduler is None:
            raise ModelNotLoaded(f"model {self.config.name} is not loaded")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        seed = request.sampling.seed if request.sampling.seed is not None else self.config.seed
        seed = RANDOM_SEED if seed is None else seed & 0xFFFFFFFF
        seq = Sequence(
            request.request_id,
            self._prompt_tokens(request),
            request.sampling,
            scheduler.samplers.chain(request.sampling, seed),
            lambda item: loop.call_soon_threadsafe(queue.put_nowait, item),
            request.stream_interval_s,
            sampler_key=Samplers.key(request.sampling, seed),
        )
        self._active += 1
        scheduler.submit(seq)
        item = None
        try:
            while (item := await queue.get()) is not END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if item is not END:  # the consumer left early, or the engine failed: free the slot
                scheduler.cancel(seq)
            self._active -= 1
            self._generation_ended()

    # -- embeddings --------------------------------------------------------------------

    async def embed(self, inputs: list[str | list[int]]) -> Embeddings:
        embedder = self._embedder
        if embedder is None:
            return await super().embed(inputs)
        tokens = [self._input_tokens(i, item) for i, item in enumerate(inputs)]
        self._active += 1
        try:
            vectors = await asyncio.to_thread(embedder.embed, tokens)
        finally:
            self._active -= 1
            self._generation_ended()
        return Embeddings(vectors, sum(len(t) for t in tokens))

    def _input_tokens(self, index: int, item: str | list[int]) -> list[int]:
        if isinstance(item, str):
            tokens = self._model.tokenize(item.encode(), add_bos=True, special=False)
        else:
            n_vocab = self._model.n_vocab()
            if any(not 0 <= t < n_vocab for t in item):
                raise InvalidRequest(f"input {index}: token ids must be in the vocabulary (0..{n_vocab - 1})")
            tokens = list(item)
        if not tokens or len(tokens) > self.config.context_size:
            raise InvalidRequest(
                f"input {index} has {len(tokens)} tokens; model {self.config.name} embeds 1 to "
                f"{self.config.context_size} tokens per input",
                code="context_length_exceeded",
            )
        return tokens
