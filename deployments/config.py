"""The application config: one strict pydantic schema, validated before anything is deployed.

``serve_config.yaml`` passes ``args`` to ``deployments.app:build_app``, which validates them
into :class:`AppConfig`. Every model is strict (unknown keys are errors), so a typo fails
``serve run`` at once with the field's path instead of a replica crash loop.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from deployments import constants as C
from deployments.placement import (
    LayoutError,
    NodeType,
    Placement,
    Resources,
    Strategy,
    node_types_of,
    node_types_of_rayservice,
    sum_resources,
)
from deployments.placement import layout_problems as layout_problems_of

# Keys Serve accepts in ``ray_actor_options`` (see ``ray.serve.api.deployment``).
_RAY_ACTOR_OPTION_KEYS = {
    "accelerator_type",
    "memory",
    "num_cpus",
    "num_gpus",
    "resources",
    "runtime_env",
    "label_selector",
}


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Deadlines(StrictModel):
    """The three deadlines of one request; ``None`` disables one."""

    first_chunk_timeout_s: PositiveFloat | None = Field(
        default=None, description="Time until the first token: queueing plus prompt processing."
    )
    chunk_timeout_s: PositiveFloat | None = Field(
        default=None, description="Longest idle time between two consecutive chunks."
    )
    request_timeout_s: PositiveFloat | None = Field(default=None, description="Total time of the request.")

    def merged_over(self, base: Deadlines) -> Deadlines:
        """These deadlines where set, ``base``'s elsewhere."""
        return base.model_copy(update=self.model_dump(exclude_none=True))


class DeadlinePolicy(StrictModel):
    """Per-model defaults, and the maxima a request may ask for."""

    default: Deadlines = Field(
        default=Deadlines(
            first_chunk_timeout_s=C.DEFAULT_FIRST_CHUNK_TIMEOUT_S,
            chunk_timeout_s=C.DEFAULT_CHUNK_TIMEOUT_S,
            request_timeout_s=C.DEFAULT_REQUEST_TIMEOUT_S,
        ),
        description="Deadlines applied when the request sets none.",
    )
    maximum: Deadlines = Field(
        default=Deadlines(
            first_chunk_timeout_s=C.MAX_FIRST_CHUNK_TIMEOUT_S,
            chunk_timeout_s=C.MAX_CHUNK_TIMEOUT_S,
            request_timeout_s=C.MAX_REQUEST_TIMEOUT_S,
        ),
        description="Upper bounds for per-request overrides.",
    )

    @model_validator(mode="after")
    def _defaults_within_maxima(self) -> DeadlinePolicy:
        for name, value in self.default.model_dump().items():
            bound = getattr(self.maximum, name)
            if value is not None and bound is not None and value > bound:
                raise ValueError(f"default.{name}={value} exceeds maximum.{name}={bound}")
        return self


class SamplingDefaults(StrictModel):
    temperature: float = Field(default=C.DEFAULT_TEMPERATURE, ge=0.0, le=2.0)
    top_p: float = Field(default=C.DEFAULT_TOP_P, gt=0.0, le=1.0)
    top_k: int = Field(default=C.DEFAULT_TOP_K, ge=0, description="0 disables top-k.")
    max_tokens: PositiveInt = Field(default=C.DEFAULT_MAX_TOKENS, description="Used when a request sets none.")


class DeploymentOptions(StrictModel):
    """Serve options of one deployment, passed through to ``Deployment.options``.

    Unset options keep the deployment's own defaults (``replica.model_deployment_options``,
    ``router.router_deployment_options``), then Serve's.
    """

    num_replicas: PositiveInt | None = Field(default=None, description="Fixed replica count (default 1).")
    autoscaling_config: dict[str, Any] | None = Field(
        default=None, description="Serve autoscaling config; exclusive with num_replicas."
    )
    max_ongoing_requests: PositiveInt | None = Field(default=None, description="Requests in flight per replica.")
    max_queued_requests: int | None = Field(
        default=None, ge=-1, description="Caller-side queue bound; -1 is unbounded."
    )
    ray_actor_options: dict[str, Any] | None = Field(default=None, description="num_cpus, num_gpus, resources, ...")
    max_replicas_per_node: PositiveInt | None = Field(default=None, le=100, description="Spread replicas over nodes.")
    max_constructor_retry_count: PositiveInt | None = Field(
        default=None, description="Attempts to start a replica before the deployment is marked failed."
    )
    logging_config: dict[str, Any] | None = Field(
        default=None, description='Serve logging, e.g. {"encoding": "JSON"} for structured logs.'
    )
    graceful_shutdown_timeout_s: PositiveFloat | None = None
    health_check_period_s: PositiveFloat | None = None
    health_check_timeout_s: PositiveFloat | None = None

    @field_validator("ray_actor_options")
    @classmethod
    def _known_actor_options(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        unknown = set(value or ()) - _RAY_ACTOR_OPTION_KEYS
        if unknown:
            raise ValueError(f"unknown ray_actor_options {sorted(unknown)}; allowed: {sorted(_RAY_ACTOR_OPTION_KEYS)}")
        return value

    @field_validator("autoscaling_config")
    @classmethod
    def _valid_autoscaling(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from ray.serve.config import AutoscalingConfig

            AutoscalingConfig(**value)  # Serve's own schema; raises with the field name.
        return value

    @model_validator(mode="after")
    def _replicas_xor_autoscaling(self) -> DeploymentOptions:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set either num_replicas or autoscaling_config, not both")
        return self

    @property
    def gpus(self) -> float:
        """The GPUs one replica spans (``ray_actor_options.num_gpus``; a fraction shares one)."""
        return float((self.ray_actor_options or {}).get("num_gpus", 0))

    def serve_options(self, defaults: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``: what is set here, over ``defaults``.

        ``env`` goes into the replicas' ``runtime_env``; the config's own ``env_vars`` win.
        """
        options = defaults | self.model_dump(exclude_none=True)
        if "autoscaling_config" in options:
            options.pop("num_replicas", None)
        if env:
            actor = dict(options.get("ray_actor_options") or {})
            runtime_env = dict(actor.get("runtime_env") or {})
            runtime_env["env_vars"] = env | dict(runtime_env.get("env_vars") or {})
            options["ray_actor_options"] = actor | {"runtime_env": runtime_env}
        return options


class ModelConfigBase(StrictModel):
    supports_vision: ClassVar[bool] = False

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$", description="The API model id.")
    context_size: PositiveInt = Field(default=C.DEFAULT_CONTEXT_SIZE, description="Context window in tokens.")
    loaded: bool = Field(default=True, description="Whether replicas hold the model in memory (user_config).")
    stall_timeout_s: PositiveFloat = Field(
        default=C.DEFAULT_STALL_TIMEOUT_S,
        description="A replica holding requests without producing a token for this long, or whose engine "
        "does not answer for this long, fails its health check and is restarted by Serve.",
    )
    stream_interval_s: float = Field(
        default=C.DEFAULT_STREAM_INTERVAL_S,
        ge=0.0,
        le=C.MAX_STREAM_INTERVAL_S,
        description="After the first token, send at most one chunk per interval, with every token generated "
        "meanwhile: each chunk costs CPU on every hop, so fast models stream faster in fewer chunks. "
        "0 sends each token alone. Capped per request at half its chunk deadline.",
    )
    background_prefills: PositiveInt | None = Field(
        default=None,
        description="Batch lines processing their prompt at once on a replica (None: as many as "
        "batch.concurrency sends). An interactive request that arrives preempts them, but waits for the "
        "engine step in progress: on CPU, 1-2 keep that step short (benchmarks: batch_serving).",
    )
    background_prefills_window_s: float = Field(
        default=C.BACKGROUND_PREFILLS_WINDOW_S,
        ge=0.0,
        description="How long after an interactive request background_prefills still bounds batch lines. A "
        "replica without one for longer gives batch lines the engine's whole batch (its next interactive "
        "request then waits for one step of their prompts); 0: never bound.",
    )
    sampling: SamplingDefaults = SamplingDefaults()
    deadlines: DeadlinePolicy = DeadlinePolicy()
    deployment: DeploymentOptions = DeploymentOptions()

    @property
    def serves_embeddings(self) -> bool:
        """Whether the model answers POST /v1/embeddings (and nothing else)."""
        return False

    @property
    def layout(self) -> dict[str, Any]:
        """Where one replica runs, as ``/v1/models`` shows it: its GPUs and how the model is split."""
        return {"gpus": self.deployment.gpus}


class GGUFModelConfig(ModelConfigBase):
    """A text model in a local GGUF file, served by llama.cpp."""

    kind: Literal["gguf"] = "gguf"
    path: Path = Field(description="Local GGUF file; relative paths resolve against the working directory.")
    gpu_layers: int | None = Field(
        default=None,
        ge=-1,
        description="Layers offloaded to the GPU; -1 offloads all. Default: all when the replica reserves GPUs "
        "(ray_actor_options.num_gpus), none otherwise (a laptop's Metal GPU needs it set: Ray does not count it).",
    )
    split_mode: Literal["none", "layer", "row"] | None = Field(
        default=None,
        description="How llama.cpp splits the model over the GPUs of one replica (num_gpus > 1): whole layers "
        "per GPU (layer) or each layer's rows (row, tensor parallel). Default: layer over several GPUs, "
        "none (all on main_gpu) on one.",
    )
    tensor_split: list[PositiveFloat] | None = Field(
        default=None, description="Share of the model on each of the replica's GPUs, e.g. [3, 1]; default: even."
    )
    main_gpu: NonNegativeInt = Field(
        default=0, description="The replica's GPU that holds the model (split_mode none) or intermediate results (row)."
    )
    n_threads: PositiveInt | None = Field(
        default=None, description="llama.cpp threads, generation and prompt processing (default: the actor's CPUs)."
    )
    seed: int | None = Field(
        default=None, ge=0, description="Sampling seed when a request sets none; unset draws a new one per request."
    )
    parallel: PositiveInt = Field(
        default=1,
        description="Sequences one replica decodes together in one llama.cpp context (continuous batching); "
        "at most llama.cpp's limit (llama_max_parallel_sequences).",
    )
    batch_tokens: PositiveInt = Field(
        default=C.DEFAULT_BATCH_TOKENS,
        description="Tokens decoded per step (n_batch): running sequences' next tokens plus prompt chunks.",
    )
    kv_cache_tokens: PositiveInt | None = Field(
        default=None,
        description="KV-cache cells of a replica (default: context_size x parallel); a finished sequence's cells "
        "stay in its slot as a prefix cache until the slot is needed.",
    )
    kv_unified: bool | None = Field(
        default=None,
        description="One KV pool that all sequences share (true), or a stream of context_size cells per sequence "
        "(false; llama-server's default for --parallel): each sequence attends over its own cells only, and a "
        "finished prompt left in its slot slows nobody. Default: a stream per sequence, unless kv_cache_tokens is "
        "below context_size x parallel, which only a shared pool can oversubscribe.",
    )
    backend_sampling: bool | None = Field(
        default=None,
        description="Sample inside llama.cpp's decode graph wherever a request's sampler chain allows it (no "
        "grammar, no logprobs): only token ids come back from the device. Default: on when layers are offloaded "
        "to a GPU.",
    )
    prompt_cache_mib: NonNegativeInt = Field(
        default=C.DEFAULT_PROMPT_CACHE_MIB,
        description="Host memory for finished prompts' KV state (llama-server's --cache-ram): a slot's prompt moves "
        "there before the slot is overwritten (in a unified pool, as soon as another request is admitted), and one "
        "that a request continues comes back instead of being prefilled again; 0 keeps finished prompts in their "
        "slots only.",
    )
    embeddings: bool = Field(
        default=False,
        description="Serve POST /v1/embeddings (one pooled vector per input) instead of chat and completions.",
    )
    pooling: Literal["mean", "cls", "last"] = Field(
        default="mean", description="How an input's token vectors become one (embeddings models)."
    )

    @property
    def serves_embeddings(self) -> bool:
        return self.embeddings

    @property
    def layout(self) -> dict[str, Any]:
        return super().layout | {
            "gpu_layers": self.gpu_layers,
            "split_mode": self.split_mode,
            "tensor_split": self.tensor_split,
            "main_gpu": self.main_gpu,
        }

    @model_validator(mode="after")
    def _gpu_layout(self) -> GGUFModelConfig:
        """One replica is one llama.cpp process on the GPUs Ray gives it (``num_gpus``)."""
        gpus = self.deployment.gpus
        if gpus > 1 and not gpus.is_integer():
            raise ValueError(f"num_gpus={gpus:g}: a replica spans whole GPUs, or shares one (a fraction below 1)")
        spanned = max(1, int(gpus))
        if self.gpu_layers is None:
            object.__setattr__(self, "gpu_layers", -1 if gpus else 0)
        if self.split_mode is None:
            object.__setattr__(self, "split_mode", "layer" if gpus > 1 else "none")
        if self.split_mode != "none" and not gpus:
            raise ValueError(
                f"split_mode={self.split_mode} splits the model over GPUs, but the replica reserves none: "
                "set deployment.ray_actor_options.num_gpus to the GPUs it spans"
            )
        if self.split_mode == "none" and gpus > 1:
            raise ValueError(
                f"num_gpus={gpus:g} with split_mode=none leaves all but main_gpu idle: "
                "set split_mode layer (or row), or num_gpus 1"
            )
        if self.tensor_split is not None and (self.split_mode == "none" or len(self.tensor_split) != spanned):
            raise ValueError(
                f"tensor_split gives {len(self.tensor_split)} shares: it needs one per GPU of the replica "
                f"(num_gpus={gpus:g}) and split_mode layer or row"
            )
        if self.main_gpu >= spanned:
            raise ValueError(f"main_gpu={self.main_gpu} is not one of the replica's GPUs (0..{spanned - 1})")
        return self

    @field_validator("parallel")
    @classmethod
    def _within_llama_limit(cls, value: int) -> int:
        import llama_cpp

        limit = llama_cpp.llama_max_parallel_sequences()
        if value > limit:
            raise ValueError(f"parallel={value} exceeds llama.cpp's limit of {limit} sequences per context")
        return value

    @model_validator(mode="after")
    def _kv_pool(self) -> GGUFModelConfig:
        every_context = self.context_size * self.parallel
        if self.kv_cache_tokens is None:
            object.__setattr__(self, "kv_cache_tokens", every_context)
        elif self.kv_cache_tokens < self.context_size:
            raise ValueError(f"kv_cache_tokens={self.kv_cache_tokens} must hold one context ({self.context_size})")
        if self.kv_unified is None:
            object.__setattr__(self, "kv_unified", self.kv_cache_tokens < every_context)
        elif not self.kv_unified and self.kv_cache_tokens < every_context:
            raise ValueError(
                f"kv_unified=false gives each of the {self.parallel} sequences its own {self.context_size} cells: "
                f"kv_cache_tokens={self.kv_cache_tokens} must be at least {every_context}, or leave kv_unified unset"
            )
        return self

    @field_validator("path")
    @classmethod
    def _gguf_file_exists(cls, value: Path) -> Path:
        path = value.expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"GGUF file not found: {path} (generate the demo models with `make models`)")
        if path.suffix != ".gguf":
            raise ValueError(f"expected a .gguf file, got {path.name}")
        return path


class VisionModelConfig(ModelConfigBase):
    """A vision-language model in a local HF-format folder, served by vLLM (PagedAttention)."""

    supports_vision: ClassVar[bool] = True

    kind: Literal["vision"] = "vision"
    path: Path = Field(description="Local HF-format checkpoint folder (config.json, weights, processor).")
    context_size: PositiveInt = Field(default=4096, description="vLLM max_model_len.")
    isq: str | None = Field(
        default=None,
        description="In-situ quantization at load: FP8 or a vLLM method name (see quantization.ISQ_METHODS).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto: the checkpoint's dtype, or bfloat16 when isq is set."
    )
    block_size: PositiveInt = Field(default=32, description="PagedAttention block size in tokens.")
    kv_cache_bytes: PositiveInt = Field(
        default=C.DEFAULT_KV_CACHE_BYTES, description="KV-cache size (vLLM kv_cache_memory_bytes)."
    )
    max_images: PositiveInt = Field(default=C.DEFAULT_MAX_IMAGES, description="Images per request.")
    tensor_parallel_size: PositiveInt = Field(
        default=1,
        description="Workers each layer is split over, one GPU each (on CPU: processes); they share one node. "
        "A replica then spans tensor_parallel_size x pipeline_parallel_size GPUs: set num_gpus to that.",
    )
    pipeline_parallel_size: PositiveInt = Field(
        default=1,
        description="Stages the layers are cut into, tensor_parallel_size workers each; stages may cross nodes.",
    )
    placement_strategy: Strategy | None = Field(
        default=None,
        description="How Ray places a parallel replica's workers (its placement group): STRICT_PACK on one node "
        "(the default, and the only choice on CPU), PACK (the default with pipeline stages: one node if there is "
        "room), SPREAD or STRICT_SPREAD (pipeline stages over nodes; not with tensor parallelism).",
    )
    worker_cpus: PositiveFloat = Field(
        default=1, description="CPUs reserved for each worker of a parallel replica; on CPU also its threads."
    )
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Share of each GPU's memory vLLM takes (weights, activations, KV cache). Default: 0.9 of the "
        "replica's share of a GPU (0.45 with num_gpus 0.5). At most that share, so the replicas Ray packs on one "
        "GPU fit in its memory together.",
    )

    @property
    def platform(self) -> Literal["cpu", "cuda"]:
        """Where the replicas run: on GPUs exactly when the deployment asks for them."""
        return "cuda" if self.deployment.gpus else "cpu"

    @property
    def world_size(self) -> int:
        """vLLM's workers per replica."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def layout(self) -> dict[str, Any]:
        return super().layout | {
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "placement_strategy": self.placement_strategy,
            "gpu_memory_utilization": self.gpu_memory_utilization,
        }

    def checkpoint_config(self) -> dict[str, Any]:
        """The checkpoint's ``config.json``."""
        return json.loads((self.path / "config.json").read_text())

    @field_validator("path")
    @classmethod
    def _checkpoint_exists(cls, value: Path) -> Path:
        path = value.expanduser().resolve()
        if not (path / "config.json").is_file():
            raise ValueError(f"no HF checkpoint (config.json) in {path} (generate the demo models with `make models`)")
        return path

    @model_validator(mode="after")
    def _platform_rules(self) -> VisionModelConfig:
        from deployments.quantization import check_isq_on_gpu, resolve_isq

        multiple = C.BLOCK_SIZE_MULTIPLE[self.platform]
        if self.block_size % multiple:
            raise ValueError(f"block_size={self.block_size} must be a multiple of {multiple} on {self.platform}")
        if self.isq is not None:
            method = resolve_isq(self.isq, self.platform)
            if self.dtype == "float32":
                raise ValueError("isq needs dtype bfloat16 or float16 (or auto)")
            accelerator = (self.deployment.ray_actor_options or {}).get("accelerator_type")
            if self.platform == "cuda" and accelerator:
                check_isq_on_gpu(method, accelerator)
        return self

    @model_validator(mode="after")
    def _parallel_layout(self) -> VisionModelConfig:
        """The layouts vLLM and Ray can run, refused here with what to change rather than at load."""
        gpus, workers = self.deployment.gpus, self.world_size
        if self.platform == "cuda":
            if workers > 1 and gpus != workers:
                raise ValueError(
                    f"tensor_parallel_size x pipeline_parallel_size = {workers} workers, one GPU each: "
                    f"set ray_actor_options.num_gpus to {workers} (the GPUs one replica spans), not {gpus:g}"
                )
            if workers == 1 and gpus > 1:
                raise ValueError(
                    f"num_gpus={gpus:g}: one vLLM worker uses one GPU; split the model with tensor_parallel_size "
                    "(or pipeline_parallel_size) to use more, or share a GPU with a fraction below 1"
                )
            share = gpus / workers
            if self.gpu_memory_utilization is None:
                object.__setattr__(self, "gpu_memory_utilization", round(C.DEFAULT_GPU_MEMORY_UTILIZATION * share, 4))
            elif self.gpu_memory_utilization > share + 1e-9:
                raise ValueError(
                    f"gpu_memory_utilization={self.gpu_memory_utilization:g} exceeds the replica's share of its GPU "
                    f"({share:g}, from num_gpus): the replicas Ray packs on that GPU would ask for more memory than it "
                    f"has; lower it to at most {share:g} or raise num_gpus"
                )
        elif self.gpu_memory_utilization is not None:
            raise ValueError("gpu_memory_utilization sizes GPU memory; on CPU, kv_cache_bytes sizes the KV cache")
        if workers == 1:
            if self.placement_strategy is not None:
                raise ValueError(
                    "placement_strategy places the workers of a parallel replica; this one has a single worker "
                    "(set tensor_parallel_size or pipeline_parallel_size)"
                )
            return self
        if self.placement_strategy is None:
            spread = self.platform == "cuda" and self.pipeline_parallel_size > 1
            strategy = "PACK" if spread else "STRICT_PACK"
            object.__setattr__(self, "placement_strategy", strategy)
        if self.platform == "cpu" and self.placement_strategy != "STRICT_PACK":
            raise ValueError(
                f"placement_strategy={self.placement_strategy}: on CPU, vLLM's workers are processes of the replica "
                "(its multiprocessing executor; vLLM's CPU platform has no Ray executor), so they share its node: "
                "use STRICT_PACK"
            )
        if self.tensor_parallel_size > 1 and self.placement_strategy in ("SPREAD", "STRICT_SPREAD"):
            raise ValueError(
                f"placement_strategy={self.placement_strategy} would put tensor-parallel ranks on different nodes, "
                "and they exchange activations in every layer: use STRICT_PACK or PACK (pipeline stages may spread)"
            )
        text = self.checkpoint_config().get("text_config") or self.checkpoint_config()
        heads, layers = text.get("num_attention_heads"), text.get("num_hidden_layers")
        if heads and heads % self.tensor_parallel_size:
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} must divide the model's {heads} attention heads"
            )
        if layers and self.pipeline_parallel_size > layers:
            raise ValueError(f"pipeline_parallel_size={self.pipeline_parallel_size} exceeds the {layers} layers")
        return self


ModelConfig = Annotated[GGUFModelConfig | VisionModelConfig, Field(discriminator="kind")]


class RemoteImages(StrictModel):
    """Fetching ``http(s)`` image URLs; off unless hosts are listed (server-side request forgery)."""

    allowed_hosts: list[str] = Field(default_factory=list, description="Exact host names that may be fetched.")
    fetch_timeout_s: PositiveFloat = Field(default=C.DEFAULT_IMAGE_FETCH_TIMEOUT_S)


class ImageLimits(StrictModel):
    max_images: PositiveInt = Field(default=C.DEFAULT_MAX_IMAGES, description="Images per request.")
    max_bytes: PositiveInt = Field(default=C.DEFAULT_MAX_IMAGE_BYTES, description="Encoded size of one image.")
    max_pixels: PositiveInt = Field(default=C.DEFAULT_MAX_IMAGE_PIXELS, description="Width x height of one image.")
    formats: list[str] = Field(default_factory=lambda: list(C.DEFAULT_IMAGE_FORMATS), description="Pillow formats.")
    remote: RemoteImages = RemoteImages()


class RouterConfig(StrictModel):
    api_key_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable holding the API key; when set, every route "
        "but /healthz requires `Authorization: Bearer <key>`.",
    )
    max_body_bytes: PositiveInt = Field(default=C.DEFAULT_MAX_BODY_BYTES, description="Request body size limit.")
    max_messages: PositiveInt = Field(default=C.DEFAULT_MAX_MESSAGES, description="Messages per request.")
    max_choices: PositiveInt = Field(
        default=C.DEFAULT_MAX_CHOICES, description="Choices per request: n, times the prompts of a text completion."
    )
    images: ImageLimits = ImageLimits()
    deployment: DeploymentOptions = DeploymentOptions()


class BatchConfig(StrictModel):
    """The Batch API: where files and batches live, and how much of each model batches may use.

    State (files' and batches' records, each line's result) is one SQLite database; file contents
    live under ``files_uri``, a directory or any URI ``pyarrow.fs`` opens (``s3://bucket/prefix``,
    ``gs://...``), the filesystem layer Ray's own storage uses. On a cluster the database must
    be on a volume that outlives the runner's node (README: Batch jobs).
    """

    database: Path = Field(
        default=Path(C.DEFAULT_BATCH_DIR) / "batches.sqlite3",
        validate_default=True,
        description="SQLite file of the Batch API's state; relative to the working dir.",
    )
    files_uri: str = Field(
        default=C.DEFAULT_BATCH_DIR + "/files",
        validate_default=True,
        description="Where file contents live: a directory (relative to the working dir) or a pyarrow.fs URI.",
    )
    max_file_bytes: PositiveInt = Field(default=C.MAX_BATCH_FILE_BYTES, description="Size limit of an uploaded file.")
    max_requests: PositiveInt = Field(default=C.MAX_BATCH_REQUESTS, description="Lines per batch input file.")
    concurrency: PositiveInt | None = Field(
        default=None,
        description="Lines of all batches in flight per model; default: half of what the model's replicas "
        "take at once, so interactive requests always find room.",
    )
    deployment: DeploymentOptions = DeploymentOptions()

    @field_validator("database")
    @classmethod
    def _absolute_database(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("files_uri")
    @classmethod
    def _absolute_files_uri(cls, value: str) -> str:
        return value if "://" in value else str(Path(value).expanduser().resolve())

    @field_validator("deployment")
    @classmethod
    def _one_runner(cls, value: DeploymentOptions) -> DeploymentOptions:
        if (value.num_replicas or 1) != 1 or value.autoscaling_config is not None:
            raise ValueError("the batch runner owns the batches' state: exactly one replica (num_replicas: 1)")
        return value


class AppConfig(StrictModel):
    """The ``args`` of the Serve application."""

    models: list[ModelConfig] = Field(min_length=1)
    router: RouterConfig = RouterConfig()
    batch: BatchConfig = BatchConfig()
    cache_dir: Path = Field(
        default=Path(".cache"),
        validate_default=True,
        description="Engine caches, compiled kernels and sockets; relative to the working dir.",
    )

    @field_validator("cache_dir")
    @classmethod
    def _absolute_cache_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        names = [m.name for m in models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate model names: {duplicates}")
        return models

    def model(self, name: str) -> ModelConfig:
        return next(m for m in self.models if m.name == name)


def layout_problems(config: AppConfig, nodes: list[NodeType]) -> list[str]:
    """Why the node types ``nodes`` cannot hold a replica of each model of ``config`` (none: they can)."""
    from deployments.quantization import resolve_isq
    from deployments.replica import model_deployment_options

    problems = []
    for model in config.models:
        options = model_deployment_options(model, config.cache_dir)
        bundles, strategy = options.get("placement_group_bundles"), options.get("placement_group_strategy")
        placement = Placement(options["ray_actor_options"], bundles, strategy)
        gpu_vision = isinstance(model, VisionModelConfig) and model.platform == "cuda"
        problems += layout_problems_of(
            model.name,
            placement,
            nodes,
            same_node_gpus=model.tensor_parallel_size if gpu_vision else 0,
            isq=resolve_isq(model.isq, "cuda") if gpu_vision and model.isq else None,
        )
    return problems


def _starting_replicas(options: dict[str, Any]) -> int:
    """Replicas a deployment starts with: ``num_replicas``, or autoscaling's initial (else minimum) count."""
    autoscaling = options.get("autoscaling_config")
    if autoscaling is None:
        return int(options.get("num_replicas") or 1)
    initial = autoscaling.get("initial_replicas")
    return int(initial if initial is not None else autoscaling.get("min_replicas", 1))


def starting_demand(config: AppConfig) -> dict[str, Resources]:
    """What each deployment of the app reserves once its starting replicas run (all of them, groups included)."""
    from deployments.batch.runner import runner_deployment_options
    from deployments.replica import deployment_name, model_deployment_options
    from deployments.router import router_deployment_options

    deployments = {
        "router": router_deployment_options(config.router),
        "batch runner": runner_deployment_options(config),
    }
    deployments |= {deployment_name(m.name): model_deployment_options(m, config.cache_dir) for m in config.models}
    demand = {}
    for name, options in deployments.items():
        placement = Placement(
            options["ray_actor_options"],
            options.get("placement_group_bundles"),
            options.get("placement_group_strategy"),
        )
        replicas = _starting_replicas(options)
        demand[name] = {key: replicas * value for key, value in sum_resources(placement.demand()).items()}
    return demand


def local_problems(apps: dict[str, AppConfig], cpus: float) -> list[str]:
    """Why a Ray started on this machine, with its ``cpus`` logical CPUs, cannot start every app's
    replicas (Serve would wait for CPUs forever, the app never ready); empty when it can."""
    demand = {(app, name): resources.get("CPU", 0.0) for app, config in apps.items()
              for name, resources in starting_demand(config).items()}  # fmt: skip
    total = sum(demand.values())
    if total <= cpus + 1e-9:
        return []
    shares = ", ".join(f"{app}/{name} {value:g}" for (app, name), value in demand.items() if value)
    return [
        f"the replicas reserve {total:g} CPUs ({shares}), but a Ray started on this machine has {cpus:g}: "
        "lower ray_actor_options.num_cpus (a logical share: a replica's threads do not follow it) or num_replicas"
    ]


def validate_serve_config(
    path: Path, cluster: Path | None = None, local_cpus: float | None = None
) -> dict[str, AppConfig]:
    """Validate a Serve config file: Ray's own schema, then ours for each of our apps, then, with
    the cluster's node types (a ``ray up`` file as ``cluster``), whether they can hold every replica;
    with ``local_cpus`` (the CPUs of a Ray that ``serve run`` starts here), whether it can start them all.

    ``path`` may be a KubeRay ``RayService``: its ``serveConfigV2`` is checked against its own
    worker groups. ``serve run config.yaml`` builds the app in a cluster task and keeps running
    when that fails, so ``make serve`` calls this first to fail at once with the field's path.

    Raises:
        pydantic.ValidationError: a field is wrong (its path and why).
        LayoutError: the node types cannot hold a replica (each problem and what to change).
        ValueError: two applications share a batch store.
    """
    import yaml
    from ray.serve.schema import ServeDeploySchema

    document = yaml.safe_load(path.read_text())
    nodes = node_types_of(cluster) if cluster is not None else None
    if document.get("kind") == "RayService":
        document, nodes = yaml.safe_load(document["spec"]["serveConfigV2"]), node_types_of_rayservice(document)
    schema = ServeDeploySchema.model_validate(document)
    apps = {
        app.name: AppConfig.model_validate(app.args)
        for app in schema.applications
        if app.import_path == "deployments.app:build_app"
    }
    stores = [str(config.batch.database) for config in apps.values()]
    if len(set(stores)) < len(stores):
        raise ValueError("two applications share batch.database: each app's batch runner needs a store of its own")
    if nodes is not None:
        problems = [problem for config in apps.values() for problem in layout_problems(config, nodes)]
        if problems:
            raise LayoutError("the cluster cannot hold this config:\n  " + "\n  ".join(problems))
    if local_cpus is not None and (problems := local_problems(apps, local_cpus)):
        raise LayoutError("this machine cannot hold this config:\n  " + "\n  ".join(problems))
    return apps


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m deployments.config",
        description="Validate a Serve config (or a RayService) before deploying it.",
    )
    parser.add_argument("config", type=Path, nargs="?", default=Path("serve_config.yaml"))
    parser.add_argument("--cluster", type=Path, help="a ray up cluster file: check the layout against its node types")
    parser.add_argument(
        "--local",
        action="store_true",
        help="check that a Ray started on this machine (its CPUs) can start every replica",
    )
    cli = parser.parse_args()
    try:
        apps = validate_serve_config(cli.config, cli.cluster, float(os.cpu_count() or 1) if cli.local else None)
    except ValueError as error:  # pydantic's ValidationError, LayoutError, a shared batch store
        sys.exit(f"{cli.config}: invalid config\n{error}")
    for app_name, app_config in apps.items():
        print(f"{cli.config}: app {app_name!r} OK ({', '.join(m.name for m in app_config.models)})")
