"""The systems under test, each started on this machine from the same model config.

- :class:`OurStack`: this project on Ray Serve (HTTP proxy -> router -> model replica, or on a
  local Ray the router's own port -> model replica), one Ray instance for the whole run, one app
  deployed per comparison.
- :func:`llama_cpp_server` / :func:`vllm_server`: the peers, as subprocesses, given the settings
  our engines derive from the same :class:`~deployments.config.ModelConfig`, so both sides run
  the same model with the same threads, context, KV cache and dtype.

Ray is imported only where our stack needs it: the peers also run on machines without it (the
GPU machine of ``benchmarks.gpu_engine`` has none).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from deployments.config import AppConfig, GGUFModelConfig, VisionModelConfig
from deployments.constants import LOCAL_ENV
from deployments.engines.vision import VLLMEngine

APP_NAME = "bench"  # served at /bench: beside an app already serving at / on a cluster
STARTUP_TIMEOUT_S = 300
LOG_DIR = Path(__file__).parent / ".logs"
SERVER_PIDS: dict[str, int] = {}  # base URL -> PID of the peer server running there


def wait_until_ready(base_url: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``/v1/models`` until it answers 200 with every model loaded (or the process dies)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready; see {LOG_DIR}")
        try:
            response = httpx.get(f"{base_url}/v1/models", timeout=5)
            models = response.json().get("data", []) if response.status_code == 200 else []
            if models and all(m.get("status", "loaded") == "loaded" for m in models):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base_url} not ready within {timeout_s:g}s")


@contextmanager
def server_process(name: str, command: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run a peer server until the block ends; its log goes to ``benchmarks/.logs/<name>.log``.

    Yields the base URL; the server's PID is ``SERVER_PIDS[base_url]`` meanwhile.
    """
    LOG_DIR.mkdir(exist_ok=True)
    log = (LOG_DIR / f"{name}.log").open("wb")
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=os.environ | (env or {}), start_new_session=True
    )
    base_url = f"http://127.0.0.1:{port}"
    SERVER_PIDS[base_url] = process.pid
    try:
        wait_until_ready(base_url, STARTUP_TIMEOUT_S, process)
        yield base_url
    finally:
        SERVER_PIDS.pop(base_url, None)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


def gguf_threads(model: GGUFModelConfig) -> int:
    """The threads our llama.cpp replica runs with: its config, else its CPUs."""
    cpus = (model.deployment.ray_actor_options or {}).get("num_cpus", 1)
    return model.n_threads or max(1, int(cpus))


def llama_cpp_server(model: GGUFModelConfig, port: int, interrupt_requests: bool) -> Any:
    """``python -m llama_cpp.server`` on our model's file and settings."""
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model.path),
        "--n_ctx", str(model.context_size),
        "--n_threads", str(gguf_threads(model)),
        "--n_threads_batch", str(gguf_threads(model)),
        "--n_gpu_layers", str(model.gpu_layers),
        "--host", "127.0.0.1", "--port", str(port),
        "--interrupt_requests", str(interrupt_requests),
    ]  # fmt: skip
    name = "llama_cpp_server" + ("" if interrupt_requests else "_serialized")
    return server_process(name, command, port)


def llama_server(model: GGUFModelConfig, port: int, backend_sampling: bool = False) -> Any:
    """llama.cpp's own ``llama-server`` (built by ``make bench`` from our wheel's sources and flags)
    with our replica's sequences, KV layout, threads and batch size; ``backend_sampling`` samples
    in the decode graph (its ``--backend-sampling``, off by default)."""
    binary = os.environ.get("LLAMA_SERVER")
    if not binary:
        raise RuntimeError("LLAMA_SERVER is not set: run the benchmarks with `make bench`, which builds it")
    threads = str(gguf_threads(model))
    command = [
        binary, "--model", str(model.path), "--host", "127.0.0.1", "--port", str(port),
        "--parallel", str(model.parallel), "--kv-unified" if model.kv_unified else "--no-kv-unified",
        "--ctx-size", str(model.kv_cache_tokens), "--threads", threads, "--threads-batch", threads,
        "--batch-size", str(model.batch_tokens), "--ubatch-size", str(model.batch_tokens),
        "--n-gpu-layers", str(model.gpu_layers), "--no-webui", *(["--backend-sampling"] if backend_sampling else []),
    ]  # fmt: skip
    name = "llama_server" + ("_backend_sampling" if backend_sampling else "")
    return server_process(name, command, port)


def process_tree_rss_mib(pids: list[int]) -> float:
    """Resident memory of these processes and all their children."""
    import psutil

    total = 0
    for pid in pids:
        root = psutil.Process(pid)
        total += sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    return round(total / 2**20, 1)


class CpuClock:
    """CPU seconds (user + system) that groups of processes spend between ``start`` and ``stop``,
    and how busy the whole machine was meanwhile: where a CPU-bound run's time goes."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        import psutil

        self._groups = {name: [psutil.Process(pid) for pid in pids] for name, pids in groups.items()}

    def _read(self) -> dict[str, float]:
        import psutil

        seconds = {name: sum(sum(p.cpu_times()[:2]) for p in procs) for name, procs in self._groups.items()}
        times = psutil.cpu_times()
        seconds["machine busy"] = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        return seconds

    def start(self) -> None:
        self._wall, self._started = time.perf_counter(), self._read()

    def stop(self) -> dict[str, float]:
        """CPU seconds per group since ``start``; ``machine busy`` as a fraction of all cores."""
        import psutil

        wall, now = time.perf_counter() - self._wall, self._read()
        spent = {name: now[name] - self._started[name] for name in now}
        spent["machine busy"] /= wall * psutil.cpu_count()
        return spent


def vllm_flags(model: VisionModelConfig) -> list[str]:
    """vLLM's command-line flags for the engine arguments of our vLLM replica."""
    kwargs = VLLMEngine(model).engine_kwargs()
    kwargs.pop("worker_extension_cls")  # our replica's health/inspection hooks
    flags = ["--served-model-name", model.name]
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        flags += [flag] if value is True else [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags


def vllm_server(model: VisionModelConfig, port: int, cache_dir: Path) -> Any:
    """vLLM's own OpenAI server with the engine arguments and environment of our vLLM replica."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port)]
    return server_process(
        "vllm_server", command + vllm_flags(model), port, env=VLLMEngine.replica_env(model, cache_dir)
    )


class OurStack:
    """One local Ray instance (or an existing cluster) with Serve's HTTP proxy on ``port``; on the
    local one each app's router also serves on its own port (``constants.LOCAL_ENV``)."""

    def __init__(self, port: int, ray_address: str | None, num_cpus: int) -> None:
        self.port = port
        self._ray_address = ray_address
        self._num_cpus = num_cpus
        self._started = False

    def _start(self) -> None:
        import ray
        from ray import serve

        if self._ray_address:  # a running cluster: its Serve proxy is already on `port`
            ray.init(address=self._ray_address, log_to_driver=False)
        else:  # a cluster has CLUSTER_ENV from its `ray start`; a local Ray inherits LOCAL_ENV
            os.environ.update(LOCAL_ENV)
            ray.init(num_cpus=self._num_cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self._started = True

    @property
    def direct_ingress(self) -> bool:
        """Whether routers serve on their own ports: on the local Ray, not on a cluster's."""
        return not self._ray_address

    @contextmanager
    def app(self, config: AppConfig, name: str = APP_NAME, direct: bool = False) -> Iterator[str]:
        """Deploy ``config`` as the app ``name`` (default ``bench``) at ``/<name>`` until the block
        ends; yields its URL through Serve's proxy, or with ``direct`` its router's own."""
        from ray import serve

        from deployments.app import build_app
        from deployments.direct_ingress import direct_urls

        if direct and not self.direct_ingress:
            raise ValueError("a cluster's routers serve only through Serve's proxy")
        if not self._started:
            self._start()
        serve.run(build_app(config), name=name, route_prefix=f"/{name}")
        base_url = direct_urls(name)[0] if direct else f"http://127.0.0.1:{self.port}/{name}"
        try:
            wait_until_ready(base_url, STARTUP_TIMEOUT_S)
            yield base_url
        finally:
            serve.delete(name)

    def model_handle(self, model: str, app: str = APP_NAME) -> Any:
        from ray import serve

        from deployments.replica import deployment_name

        return serve.get_deployment_handle(deployment_name(model), app_name=app)

    async def wait_idle(self, model: str, timeout_s: float = 30) -> None:
        """Until the model's engine reports no generation (a cancelled one has stopped)."""
        handle = self.model_handle(model)
        deadline = time.monotonic() + timeout_s
        while (await handle.info.remote()).active_generations:
            if time.monotonic() > deadline:
                raise TimeoutError(f"model {model} still generating {timeout_s}s after its request ended")
            await asyncio.sleep(0.005)

    def replica_pid(self, model: str) -> int:
        """The PID of the model's (single) replica actor."""
        (pid,) = self.replica_pids(model)
        return pid

    def replica_pids(self, model: str, app: str = APP_NAME) -> list[int]:
        """The PIDs of the model's replica actors in ``app``."""
        from deployments.replica import deployment_name

        return self.deployment_pids(deployment_name(model), app)

    def deployment_pids(self, deployment: str, app: str = APP_NAME) -> list[int]:
        """The PIDs of the replica actors of ``deployment`` in ``app``."""
        import ray

        prefix = f"SERVE_REPLICA::{app}#{deployment}#"
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
        return [ray.get(ray.get_actor(n, namespace="serve").__ray_call__.remote(lambda _: os.getpid())) for n in names]

    def shutdown(self) -> None:
        if self._started:
            import ray
            from ray import serve

            if not self._ray_address:  # never shut down a cluster's Serve
                serve.shutdown()
            ray.shutdown()
