"""The replica contract shared by the llama.cpp and vLLM engines.

An engine owns one model in one replica: it loads and unloads it, describes it, and turns a
:class:`GenerationRequest` into an async stream of :class:`Delta` objects. The router never
sees an engine; it talks to the replica deployment (``deployments.replica``) through Serve
handles, and the replica forwards to whichever engine its config names.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from deployments.config import ModelConfig
from deployments.errors import InvalidRequest
from deployments.placement import Placement


class ModelStatus(enum.StrEnum):
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADED = "unloaded"
    FAILED = "failed"
    MIXED = "mixed"  # replicas disagree (e.g. one loaded, one failed): ``ModelInfo.replicas`` counts them


class JsonOutput(BaseModel):
    """Output that must parse as JSON: an object matching ``json_schema``, or any object if None.

    Engines enforce it by constrained decoding, so even a random-weight model emits valid JSON
    (unless ``max_tokens`` cuts it short: ``finish_reason`` is then ``length``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    json_schema: dict[str, Any] | None = None


class SamplingParams(BaseModel):
    """Resolved sampling settings: request values over the model's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = Field(default=False, description="Generate exactly max_tokens (benchmarks).")
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = Field(default=(), description="(token id, bias) pairs.")
    json_output: JsonOutput | None = Field(default=None, description="Constrain the output to JSON.")
    logprobs: int | None = Field(default=None, description="Report each token's logprob and this many alternatives.")

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


class Prompt(BaseModel):
    """What a prompt is made of: raw text, or messages (and tools) for the chat template.
    ``Engine.tokenize`` takes one; a generation request is one, with how to generate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    messages: tuple[dict[str, Any], ...] = Field(
        default=(), description="Chat messages: string content, or parts {type: text, text} / {type: image} in order."
    )
    prompt: str | None = Field(default=None, description="Raw text instead of messages (text completions).")
    images: tuple[bytes, ...] = Field(default=(), description="Verified image bytes, one per image part, in order.")
    tools: tuple[dict[str, Any], ...] = Field(default=(), description="OpenAI tool specs, for the chat template.")


class Priority(enum.IntEnum):
    """Who is waiting for a generation (lower first, as vLLM's priority scheduling orders them)."""

    INTERACTIVE = 0  # a client holds a connection open
    BACKGROUND = 1  # a line of a batch job: it waits while interactive requests run on its replica


class GenerationRequest(Prompt):
    """What crosses the handle from router to replica: small, serializable, engine-ready."""

    request_id: str
    sampling: SamplingParams
    stream_interval_s: float = Field(
        default=0.0, ge=0.0, description="Coalesce deltas into one chunk per interval after the first; 0: every delta."
    )
    priority: Priority = Field(
        default=Priority.INTERACTIVE, description="Background work starts only in capacity interactive requests leave."
    )


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV cells came from the cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Embeddings:
    """Vectors of one embeddings request, one row per input, and the tokens they took."""

    vectors: np.ndarray  # float32, (inputs, dimensions), L2-normalized
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log-probability under the model (before sampling options), with the
    most likely alternatives when asked. Tokens are bytes: one may hold part of a character."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(slots=True)
class Delta:
    """One chunk of generated text. The last delta of a stream has ``finish_reason`` and ``usage``.

    A slotted dataclass, not a pydantic model: one crosses the handle per token, and its
    pickling cost is on the hot path.
    """

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens behind this delta, when the request asks
    stop_sequence: str | None = None  # the stop string that ended the stream (finish_reason "stop")

    @staticmethod
    def join(deltas: Sequence[Delta]) -> Delta:
        """Consecutive deltas as one (the stream's coalescing): their text, the last one's ending."""
        if len(deltas) == 1:
            return deltas[0]
        logprobs = tuple(lp for d in deltas for lp in d.logprobs)
        last = deltas[-1]
        return Delta("".join(d.text for d in deltas), last.finish_reason, last.usage, logprobs, last.stop_sequence)


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What a model's files say about it, known without loading it."""

    name: str  # the model's own name: GGUF file stem, checkpoint folder name
    size_bytes: int
    quantization: str | None


class ModelInfo(BaseModel):
    """What a replica reports about its model (nika's ``ModelInfo`` plus serving state)."""

    id: str = Field(description="The API model id.")
    kind: str
    name: str = Field(description="The model's own name: GGUF file stem or checkpoint folder name.")
    size_bytes: int
    quantization: str | None
    context_length: int
    supports_vision: bool
    embeddings: bool = Field(default=False, description="Serves POST /v1/embeddings (and nothing else).")
    layout: dict[str, Any] = Field(
        default_factory=dict, description="Where one replica runs: its GPUs and how the model is split over them."
    )
    status: ModelStatus
    replicas: dict[ModelStatus, int] = Field(
        default_factory=dict, description="Replicas by status, as the router merged their reports."
    )
    active_generations: int = 0
    engine_stats: dict[str, float] = Field(
        default_factory=dict, description="The engine's own counters, summed over replicas (ratios: the highest)."
    )
    idle_since: float | None = Field(
        default=None,
        description="Unix time the engine last finished or stopped a generation; None while it generates.",
    )
    error: str | None = None

    @classmethod
    def describe(cls, config: ModelConfig, facts: ModelFacts, status: ModelStatus, **state: Any) -> ModelInfo:
        """The card of ``config``: the same whether a replica reports it or the router does for it."""
        return cls(
            id=config.name,
            kind=config.kind,
            name=facts.name,
            size_bytes=facts.size_bytes,
            quantization=facts.quantization,
            context_length=config.context_size,
            supports_vision=config.supports_vision,
            embeddings=config.serves_embeddings,
            layout=config.layout,
            status=status,
            **state,
        )


class Engine(abc.ABC):
    """One model in one replica; ``generate`` states the stream contract."""

    kind: ClassVar[str]
    serve_loop_for_user_code: ClassVar[bool] = False  # see engines.engine_env

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.facts = self.describe(config)
        self.idle_since: float | None = None  # set by the engine when its last generation ends

    @classmethod
    @abc.abstractmethod
    def describe(cls, config: ModelConfig) -> ModelFacts:
        """What the model's files say, without loading it; raise ``ModelLoadFailed`` for an unreadable file.

        The router calls it too, for the card of a model no replica answers for.
        """

    @classmethod
    @abc.abstractmethod
    def max_ongoing_requests(cls, config: ModelConfig) -> int:
        """Serve's bound on the requests one replica holds, unless the config sets one."""

    @classmethod
    def placement(cls, config: ModelConfig, actor_options: dict[str, Any]) -> Placement:
        """What one replica reserves from Ray: by default its actor alone, one process."""
        return Placement(dict(actor_options))

    @classmethod
    def target_ongoing_requests(cls, config: ModelConfig) -> int | None:
        """The autoscaling target per replica (what one replica runs at once); None: Serve's default."""
        return None

    def stats(self) -> dict[str, float]:
        """The engine's own counters (batch size, KV-cache usage, prefix-cache hits, ...)."""
        return {}

    @classmethod
    def replica_env(cls, config: ModelConfig, cache_dir: Path) -> dict[str, str]:
        """Environment variables a replica needs before the engine's libraries are imported."""
        return {}

    def _generation_ended(self) -> None:
        """Engines call this as each generation ends, finished, failed or stopped."""
        if not self.active_generations():
            self.idle_since = time.time()

    @abc.abstractmethod
    async def load(self) -> None:
        """Load the model into memory; raise ``ModelLoadFailed`` with the reason."""

    @abc.abstractmethod
    async def unload(self) -> None:
        """Stop in-flight generations and free the model's memory."""

    def info(self, status: ModelStatus, error: str | None = None) -> ModelInfo:
        """Describe the model; works whether or not it is loaded."""
        active = self.active_generations()
        return ModelInfo.describe(
            self.config,
            self.facts,
            status,
            replicas={status: 1},
            active_generations=active,
            engine_stats=self.stats(),
            idle_since=None if active else self.idle_since,
            error=error,
        )

    @abc.abstractmethod
    def active_generations(self) -> int:
        """Generations running in the engine now (the engine's own count)."""

    async def check_health(self, timeout_s: float) -> None:  # noqa: B027 - optional hook
        """Raise if the engine cannot make progress (its own errors, an unresponsive process).

        The replica already detects in-flight work without tokens; engines add what only they see.
        """

    async def workers(self) -> list[dict[str, Any]]:
        """The processes that run the model, with their ranks: by default the replica's own."""
        import os

        return [{"rank": 0, "pid": os.getpid()}]

    @abc.abstractmethod
    async def layer_types(self) -> dict[str, int]:
        """How the loaded weights are stored: type or method name -> count of tensors/layers."""

    async def embed(self, inputs: list[str | list[int]]) -> Embeddings:
        """One normalized vector per input (text or token ids); engines that embed override it."""
        raise InvalidRequest(
            f"model {self.config.name} is not configured for embeddings", code="embeddings_not_supported"
        )

    @abc.abstractmethod
    async def tokenize(self, prompt: Prompt, add_special: bool = True) -> list[int]:
        """The token ids a generation from ``prompt`` starts with: raw text as it is (after the
        model's special opening tokens, unless ``add_special`` is false), or the messages through
        the model's chat template with the generation prompt. Requires a loaded model."""

    @abc.abstractmethod
    async def detokenize(self, tokens: list[int]) -> str:
        """The text of ``tokens``; an id outside the vocabulary is an ``InvalidRequest``."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream the completion of ``request``; requires a loaded model.

        The stream contract, which the replica enforces for every engine
        (``replica.ModelReplica.generate``):

        - a stream that completes ends with exactly one delta carrying ``finish_reason`` and
          ``usage``, and nothing after it;
        - a generation that cannot complete raises a ``ServeError`` saying why (request
          validation: ``InvalidRequest``; the model unloaded meanwhile: ``ModelNotLoaded``; the
          engine failed: ``InferenceFailed``), never ends quietly;
        - when the consumer stops early (``aclose`` or task cancellation) the engine stops the
          work before returning, so a cancelled request frees the engine within one step.
        """
