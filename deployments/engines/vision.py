"""vLLM engine: a local HF-format vision-language model on ``AsyncLLM`` (v1, PagedAttention).

The engine streams token deltas (``RequestOutputKind.DELTA``). Closing its ``generate``
stream, which a cancelled replica task does through ``aclosing``, aborts the request in
vLLM: the scheduler drops it and frees its KV blocks at once. In-situ quantization of an
unquantized checkpoint is vLLM's online quantization, chosen per platform in
``quantization.resolve_isq``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

from deployments.config import VisionModelConfig
from deployments.engines.base import (
    Delta,
    Engine,
    GenerationRequest,
    ModelFacts,
    Prompt,
    SamplingParams,
    TokenLogprob,
    Usage,
)
from deployments.errors import InferenceFailed, InvalidRequest, ModelLoadFailed, ModelNotLoaded
from deployments.images import open_rgb
from deployments.placement import ACCELERATOR_HINT, Placement, accelerator_resource, worker_group
from deployments.quantization import resolve_isq
from deployments.tools import template_input

logger = logging.getLogger("ray.serve")

DEFAULT_MAX_ONGOING_REQUESTS = 32  # vLLM batches many requests (continuous batching)


def checkpoint_size_bytes(config: VisionModelConfig) -> int:
    return sum(f.stat().st_size for f in config.path.iterdir() if f.is_file())


def checkpoint_quantization(config: VisionModelConfig) -> str | None:
    """The quantization a checkpoint ships with (``quantization_config.quant_method``), if any."""
    return (config.checkpoint_config().get("quantization_config") or {}).get("quant_method")


def resolve_dtype(config: VisionModelConfig, isq: str | None) -> str:
    """``auto`` is the checkpoint's own dtype, or bfloat16 under ISQ (online quantization needs
    16-bit). Spelled out because vLLM's own ``auto`` runs float32 checkpoints in bfloat16 on CPU.
    """
    if config.dtype != "auto":
        return config.dtype
    if isq:
        return "bfloat16"
    checkpoint = config.checkpoint_config()
    return checkpoint.get("dtype") or checkpoint.get("torch_dtype") or "auto"


class WorkerInspection:
    """Mixed into vLLM's worker (``worker_extension_cls``), where the model lives, so the
    replica can ask about it by name over ``collective_rpc`` (no pickled code crosses)."""

    model_runner: Any

    def ping(self) -> bool:
        return True

    def worker_info(self) -> dict[str, Any]:
        """Who this worker is: its ranks, process and node."""
        import socket

        from vllm.distributed import parallel_state

        return {
            "rank": parallel_state.get_world_group().rank_in_group,
            "tensor_rank": parallel_state.get_tp_group().rank_in_group,
            "pipeline_rank": parallel_state.get_pp_group().rank_in_group,
            "pid": os.getpid(),
            "node": socket.gethostname(),
        }

    def count_layer_methods(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for module in self.model_runner.get_model().modules():
            method = getattr(module, "quant_method", None)
            if method is not None:
                counts[type(method).__name__] = counts.get(type(method).__name__, 0) + 1
        return counts


class VLLMEngine(Engine):
    kind = "vision"
    serve_loop_for_user_code = True
    config: VisionModelConfig

    @classmethod
    def replica_env(cls, config: VisionModelConfig, cache_dir: Path) -> dict[str, str]:
        """Environment of a vLLM replica, set before vLLM is imported (Ray ``runtime_env``).

        vLLM's caches, compiled kernels and IPC sockets go to the project's cache folder, never
        to shared system paths; nothing is fetched from a hub. On CPU, vLLM must not pin its
        threads to cores that llama.cpp replicas share, and uses as many threads as the replica
        has CPUs, in the engine-core process itself.
        """
        env = {
            "HF_HUB_OFFLINE": "1",
            "TMPDIR": str(cache_dir / "tmp"),
            "VLLM_RPC_BASE_PATH": str(cache_dir / "tmp"),
            "VLLM_CACHE_ROOT": str(cache_dir / "vllm"),
            "TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "torchinductor"),
        }
        if config.platform == "cpu":
            # Threads of the process that runs the model: the replica's, or each parallel worker's.
            cpus = (config.deployment.ray_actor_options or {}).get("num_cpus", 1)
            cpus = config.worker_cpus if config.world_size > 1 else cpus
            env |= {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(max(1, int(cpus)))}
            # The model runs in the engine-core process (vLLM's "uni" executor). vLLM's CPU default puts
            # it in a worker process of its own, and the engine core then busy-polls shared memory for
            # its results: ~80% of a core spent waiting. AsyncLLM keeps its engine-core process either way.
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        return env

    @classmethod
    def max_ongoing_requests(cls, config: VisionModelConfig) -> int:
        return DEFAULT_MAX_ONGOING_REQUESTS

    @classmethod
    def placement(cls, config: VisionModelConfig, actor_options: dict[str, Any]) -> Placement:
        """A parallel replica reserves a bundle per worker: a GPU each (Ray's executor starts the
        workers in the group), or on CPU their CPUs (workers are the replica's own processes)."""
        if config.world_size == 1:
            return super().placement(config, actor_options)
        worker = {"CPU": config.worker_cpus}
        if config.platform == "cuda":
            worker["GPU"] = 1.0
            if accelerator := actor_options.get("accelerator_type"):
                worker[accelerator_resource(accelerator)] = ACCELERATOR_HINT
        assert config.placement_strategy is not None  # the config's default for a parallel replica
        return worker_group(actor_options, config.world_size, worker, config.placement_strategy)

    @classmethod
    def describe(cls, config: VisionModelConfig) -> ModelFacts:
        isq = resolve_isq(config.isq, config.platform) if config.isq else None
        return ModelFacts(config.path.name, checkpoint_size_bytes(config), isq or checkpoint_quantization(config))

    def __init__(self, config: VisionModelConfig) -> None:
        for var in ("TMPDIR", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR"):
            if var in os.environ:
                Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
        super().__init__(config)
        self._isq = resolve_isq(config.isq, config.platform) if config.isq else None
        self._engine: Any = None
        self._tokenizer: Any = None
        self._requests: set[str] = set()  # in flight, for unload to abort

    def engine_kwargs(self) -> dict[str, Any]:
        """vLLM engine arguments of this model (also what a benchmark gives vLLM's own server)."""
        cfg = self.config
        args: dict[str, Any] = {
            "model": str(cfg.path),
            "max_model_len": cfg.context_size,
            "block_size": cfg.block_size,
            "dtype": resolve_dtype(cfg, self._isq),
            "quantization": self._isq,
            "limit_mm_per_prompt": {"image": cfg.max_images},
            "seed": 0,
            "worker_extension_cls": f"{WorkerInspection.__module__}.{WorkerInspection.__qualname__}",
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "pipeline_parallel_size": cfg.pipeline_parallel_size,
            # Interactive requests (priority 0) are scheduled before batch lines, which are preempted
            # first when the KV cache runs short.
            "scheduling_policy": "priority",
        }
        if cfg.world_size > 1:  # CPU has no Ray executor (CpuPlatform.ray_device_key is empty)
            args["distributed_executor_backend"] = "ray" if cfg.platform == "cuda" else "mp"
        if cfg.platform == "cuda":
            args["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.platform == "cpu":
            # CPU: no CUDA graphs, and an explicit KV-cache size (vLLM otherwise sizes it from
            # the NUMA node's free memory and refuses to start on small nodes).
            args |= {"enforce_eager": True, "kv_cache_memory_bytes": cfg.kv_cache_bytes}
        return args

    # -- lifecycle ---------------------------------------------------------------------

    async def load(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        try:
            self._engine = AsyncLLM.from_vllm_config(await self._vllm_config())
            self._tokenizer = self._engine.get_tokenizer()
        except Exception as exc:
            raise ModelLoadFailed(f"failed to load {self.config.path.name}: {type(exc).__name__}: {exc}") from exc

    async def _vllm_config(self) -> Any:
        """vLLM's config of this model. Workers on GPUs go into the replica's placement group
        (Ray's executor); the config is made where a GPU is visible, in a task in that group, as
        Ray Serve LLM does: the replica actor itself holds no GPU (``placement.worker_group``)."""
        from vllm import AsyncEngineArgs

        args = AsyncEngineArgs(**self.engine_kwargs())
        if not (self.config.platform == "cuda" and self.config.world_size > 1):
            return args.create_engine_config()
        import ray
        from ray.util import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = get_current_placement_group()
        task = ray.remote(_create_engine_config).options(
            num_cpus=0,
            num_gpus=ACCELERATOR_HINT,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0),
        )
        config = await task.remote(args)
        config.parallel_config.placement_group = group
        return config

    async def unload(self) -> None:
        engine, self._engine, self._tokenizer = self._engine, None, None
        if engine is not None:
            # Abort first: shutdown alone leaves in-flight streams waiting for output forever.
            await engine.abort(list(self._requests))
            engine.shutdown()  # stops the engine-core process
            gc.collect()

    def active_generations(self) -> int:
        """Requests vLLM itself still holds (not the replica's view)."""
        return 0 if self._engine is None else self._engine.output_processor.get_num_unfinished_requests()

    async def check_health(self, timeout_s: float) -> None:
        """vLLM's own error state, then a round trip to the engine-core process: a stopped or
        wedged core answers nothing, even when no request is in flight to show it."""
        if self._engine is None:
            return
        if self._engine.errored:
            raise RuntimeError(f"vLLM engine of model {self.config.name} has errored: {self._engine.dead_error}")
        try:
            await asyncio.wait_for(self._engine.collective_rpc("ping"), timeout_s)
        except TimeoutError:
            raise RuntimeError(
                f"vLLM engine of model {self.config.name} did not answer within {timeout_s:g}s"
            ) from None

    async def workers(self) -> list[dict[str, Any]]:
        if self._engine is None:
            raise ModelNotLoaded(f"model {self.config.name} is not loaded")
        return await self._engine.collective_rpc("worker_info")

    async def layer_types(self) -> dict[str, int]:
        """vLLM's layer methods in the loaded model (``Fp8...LinearMethod`` when ISQ applied)."""
        if self._engine is None:
            raise ModelNotLoaded(f"model {self.config.name} is not loaded")
        (counts,) = await self._engine.collective_rpc("count_layer_methods")
        return counts

    # -- generation --------------------------------------------------------------------

    async def tokenize(self, prompt: Prompt, add_special: bool = True) -> list[int]:
        if self._tokenizer is None:
            raise ModelNotLoaded(f"model {self.config.name} is not loaded")
        if prompt.images or any(isinstance(m.get("content"), list) for m in prompt.messages):
            raise InvalidRequest(
                "cannot count the tokens of images: vLLM's processor turns each into the model's own "
                "number of tokens while it generates; send the text only"
            )
        # What vLLM does with the prompt text generate hands it (special tokens per its tokenizer).
        return self._tokenizer.encode(self._prompt(prompt)["prompt"], add_special_tokens=add_special)

    async def detokenize(self, tokens: list[int]) -> str:
        if self._tokenizer is None:
            raise ModelNotLoaded(f"model {self.config.name} is not loaded")
        if bad := sorted({t for t in tokens if not 0 <= t < len(self._tokenizer)}):
            raise InvalidRequest(f"tokens {bad[:8]} are not in the vocabulary (0..{len(self._tokenizer) - 1})")
        return self._tokenizer.decode(tokens)

    def _prompt(self, request: Prompt) -> dict[str, Any]:
        if request.prompt is not None:  # a text completion: the text as it is
            return {"prompt": request.prompt}
        try:
            messages, tools = template_input(request.messages, request.tools, self._tokenizer.chat_template or "")
            text = self._tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:
            raise InvalidRequest(f"the messages do not fit the model's chat template: {exc}") from None
        prompt: dict[str, Any] = {"prompt": text}
        if request.images:
            prompt["multi_modal_data"] = {"image": [open_rgb(data) for data in request.images]}
        return prompt

    def _sampling(self, request: GenerationRequest) -> Any:
        from vllm.sampling_params import StructuredOutputsParams

        s = request.sampling
        structured = None
        if s.json_output is not None:  # no free whitespace: a weak model could emit blanks forever
            schema = s.json_output.json_schema
            structured = StructuredOutputsParams(
                json=schema, json_object=None if schema else True, disable_any_whitespace=True
            )
        try:
            return self._vllm_sampling(s, structured)
        except ValueError as exc:
            raise InvalidRequest(f"model {self.config.name} rejected the sampling options: {exc}") from None

    @staticmethod
    def _vllm_sampling(s: SamplingParams, structured: Any) -> Any:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VLLMSamplingParams(
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else -1,
            min_p=s.min_p,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty,
            logit_bias=dict(s.logit_bias) or None,
            logprobs=s.logprobs,
            structured_outputs=structured,
            max_tokens=s.max_tokens,
            stop=list(s.stop) or None,
            seed=s.seed,
            ignore_eos=s.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if self._engine is None:
            raise ModelNotLoaded(f"model {self.config.name} is not loaded")
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        prompt, sampling = self._prompt(request), self._sampling(request)
        request_id = f"{request.request_id}-{uuid.uuid4().hex[:8]}"  # unique even if a caller retries an id
        prompt_tokens = completion_tokens = 0
        accepted = False
        self._requests.add(request_id)
        try:
            # aclosing: closing this stream aborts the request in vLLM now, not when it is collected.
            async with aclosing(
                self._engine.generate(prompt, sampling, request_id=request_id, priority=int(request.priority))
            ) as outputs:
                async for output in outputs:
                    accepted = True
                    prompt_tokens = len(output.prompt_token_ids or ()) or prompt_tokens
                    completion = output.outputs[0]
                    completion_tokens += len(completion.token_ids)
                    logprobs = _token_logprobs(completion, request.sampling.logprobs)
                    if completion.text or logprobs:
                        yield Delta(completion.text, logprobs=logprobs)
                    if output.finished and completion.finish_reason != "abort":  # abort: ended by unload
                        usage = Usage(prompt_tokens, completion_tokens)
                        stop = completion.stop_reason if isinstance(completion.stop_reason, str) else None
                        yield Delta("", completion.finish_reason or "stop", usage, stop_sequence=stop)
        except (ValueError, VLLMClientError) as exc:
            if accepted:  # vLLM validates a request (prompt length, logit bias, ...) before its first output
                raise
            raise InvalidRequest(f"model {self.config.name} rejected the request: {exc}") from None
        except (EngineGenerateError, EngineDeadError) as exc:
            cause = exc.__cause__ or exc
            logger.error("vLLM failed in request %s", request.request_id, exc_info=cause)
            raise InferenceFailed(f"vLLM failed while generating ({type(cause).__name__})") from None
        finally:
            self._requests.discard(request_id)
            self._generation_ended()


def _create_engine_config(args: Any) -> Any:
    return args.create_engine_config()


def _token_logprobs(completion: Any, top: int | None) -> tuple[TokenLogprob, ...]:
    """vLLM's per-token logprob maps (the sampled token and the ``top`` ranked ones) as ours."""
    if top is None or not completion.logprobs:
        return ()
    out = []
    for token_id, ranked in zip(completion.token_ids, completion.logprobs, strict=True):
        alternatives = sorted(
            (lp for lp in ranked.values() if lp.rank is not None and lp.rank <= top), key=lambda lp: lp.rank
        )
        chosen = ranked[token_id]
        out.append(
            TokenLogprob(
                (chosen.decoded_token or "").encode(),
                chosen.logprob,
                tuple(((lp.decoded_token or "").encode(), lp.logprob) for lp in alternatives),
            )
        )
    return tuple(out)
