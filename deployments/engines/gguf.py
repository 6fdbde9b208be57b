"""llama.cpp engine: a local GGUF file served by llama-cpp-python.

llama.cpp contexts are not thread-safe and generation is blocking, so every call into the
model (load, generate, unload) runs on one worker thread owned by the engine: one
generation at a time, the event loop never blocked. A per-request stop flag is checked at
every sampled token (from a stopping criterion, which llama.cpp calls once per token even
while stop-string matching holds text back), so a cancelled request frees the engine within one
token.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from deployments.config import GGUFModelConfig
from deployments.engines.base import Delta, Engine, GenerationRequest, ModelFacts, Usage
from deployments.errors import InferenceFailed, InvalidRequest, ModelLoadFailed, ModelNotLoaded, ServeError
from deployments.quantization import resolve_gguf_quantization

logger = logging.getLogger("ray.serve")


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


class _TokenWatch:
    """A llama.cpp stopping criterion: called once per sampled token, in Python.

    It ends the generation when the stop flag is set, and counts completion tokens
    (llama-cpp-python's stream carries no usage): the ids it sees are the prompt plus the
    tokens evaluated so far, which is one behind the token just sampled.
    """

    def __init__(self, stop: threading.Event, prompt_tokens: int) -> None:
        self.stop = stop
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0

    def __call__(self, input_ids: np.ndarray, logits: np.ndarray) -> bool:
        self.completion_tokens = max(self.completion_tokens, len(input_ids) - self.prompt_tokens + 1)
        return self.stop.is_set()


_DONE = object()


class LlamaCppEngine(Engine):
    kind = "gguf"
    # One generation at a time: the spare slots let control calls (info, reconfigure) and the
    # next request reach the replica while it generates.
    default_max_ongoing_requests = 4

    config: GGUFModelConfig

    @classmethod
    def describe(cls, config: GGUFModelConfig) -> ModelFacts:
        facts = _read_facts(config.path)
        return ModelFacts(config.path.stem, facts.size_bytes, facts.quantization)

    def __init__(self, config: GGUFModelConfig) -> None:
        super().__init__(config)
        # One thread: llama.cpp contexts are not thread-safe, and it serializes generations.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{config.name}")
        self._llm: Any = None
        self._formatter: Any = None
        self._stop_flags: set[threading.Event] = set()
        self._active = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def load(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._worker, self._load_blocking)

    def _load_blocking(self) -> None:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        cfg = self.config
        # Prompt processing too: llama.cpp's default there is every core of the node, which
        # oversubscribes the CPUs when replicas share a node, and its spinning thread barriers
        # then stall (measured: 2 replicas on 2 cores ran no faster than 1).
        threads = cfg.n_threads or _assigned_cpus()
        try:
            llm = llama_cpp.Llama(
                model_path=str(cfg.path),
                n_ctx=cfg.context_size,
                n_gpu_layers=cfg.gpu_layers,
                n_threads=threads,
                n_threads_batch=threads,
                seed=cfg.seed,
                verbose=False,
            )
        except ValueError as exc:  # llama-cpp-python's only signal for a file it cannot load
            raise ModelLoadFailed(f"failed to load {cfg.path.name}: {exc}") from exc
        template = llm.metadata.get("tokenizer.chat_template")
        if template is None:
            raise ModelLoadFailed(f"{cfg.path.name} has no tokenizer.chat_template")
        vocab = llm._model  # token text for the template's bos/eos variables
        self._formatter = Jinja2ChatFormatter(
            template=template,
            bos_token=vocab.token_get_text(llm.token_bos()),
            eos_token=vocab.token_get_text(llm.token_eos()),
        )
        self._llm = llm

    async def unload(self) -> None:
        for flag in list(self._stop_flags):
            flag.set()
        # Queued behind any generation still finishing its current token.
        await asyncio.get_running_loop().run_in_executor(self._worker, self._unload_blocking)

    def _unload_blocking(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = self._formatter = None
            gc.collect()

    def active_generations(self) -> int:
        return self._active

    async def layer_types(self) -> dict[str, int]:
        """GGUF tensor types (``Q4_K``, ``Q6_K``, ``F32``, ...) as the file stores them."""
        return (await asyncio.to_thread(_read_facts, self.config.path)).tensor_types

    # -- generation --------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if self._llm is None:
            raise ModelNotLoaded(f"model {self.config.name} is not loaded")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        self._stop_flags.add(stop)

        def emit(item: Delta) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        job = loop.run_in_executor(self._worker, self._generate_blocking, request, emit, stop)
        # Scheduled after every emit() of the job, so it is always the last item.
        job.add_done_callback(lambda _: queue.put_nowait(_DONE))
        try:
            while (item := await queue.get()) is not _DONE:
                yield item
            try:
                job.result()  # re-raise what the worker raised
            except ServeError:
                raise
            except Exception as exc:  # llama.cpp (or llama-cpp-python) failed: no internals to the client
                logger.error("llama.cpp failed in request %s", request.request_id, exc_info=exc)
                raise InferenceFailed(f"llama.cpp failed while generating ({type(exc).__name__})") from exc
        finally:
            stop.set()
            self._stop_flags.discard(stop)

    def _generate_blocking(
        self, request: GenerationRequest, emit: Callable[[Delta], None], stop: threading.Event
    ) -> None:
        if stop.is_set():  # cancelled while queued behind another generation
            return
        from llama_cpp import StoppingCriteriaList

        llm = self._llm
        if llm is None:
            raise ModelNotLoaded(f"model {self.config.name} is not loaded")
        self._active += 1
        try:
            prompt = self._formatter(messages=list(request.messages))
            tokens = llm.tokenize(prompt.prompt.encode(), add_bos=not prompt.added_special, special=True)
            sampling = request.sampling
            if len(tokens) + sampling.max_tokens > self.config.context_size:
                raise InvalidRequest(
                    f"the prompt has {len(tokens)} tokens; with max_tokens={sampling.max_tokens} it exceeds "
                    f"the context of {self.config.context_size} tokens of model {self.config.name}; "
                    "shorten the messages or lower max_tokens",
                    code="context_length_exceeded",
                )
            watch = _TokenWatch(stop, len(tokens))
            finish_reason = "stop"
            for chunk in llm.create_completion(
                prompt=tokens,
                max_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                stop=[*sampling.stop, *(prompt.stop or [])],
                seed=sampling.seed if sampling.seed is not None else self.config.seed,
                stream=True,
                stopping_criteria=StoppingCriteriaList([watch]),
                logit_bias={llm.token_eos(): -1e9} if sampling.ignore_eos else None,
            ):
                choice = chunk["choices"][0]
                if choice["text"]:
                    emit(Delta(choice["text"]))
                finish_reason = choice["finish_reason"] or finish_reason
            if not stop.is_set():
                emit(Delta("", finish_reason=finish_reason, usage=Usage(len(tokens), watch.completion_tokens)))
        finally:
            self._active -= 1
            self._generation_ended()
