"""The batch runner: one Serve replica that owns the Batch API's store and runs its batches.

The router forwards every Files and Batches call here. A batch goes validating -> in_progress
-> finalizing -> completed (or failed at validation, expired at its window's end, cancelling ->
cancelled). Its lines run through ``BatchServing`` with the model deployments' handles, at most
``batch.concurrency`` lines per model across all batches, as background work that yields to
interactive requests on each replica. Each line's result is recorded once; a runner that starts
(after a crash, a redeploy, a cluster restart) carries on every unfinished batch from its store.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ray.serve.handle import DeploymentHandle

from deployments import constants as C
from deployments.batch.store import Store
from deployments.config import AppConfig, ModelConfig
from deployments.errors import Conflict, InvalidRequest, PayloadTooLarge, ServeError, as_serve_error
from deployments.metrics import router_metrics
from deployments.protocol.batches import (
    BatchCreateRequest,
    BatchStatus,
    line_not_run,
    line_output,
    new_id,
    parse_line,
    scan_input,
)
from deployments.serving.batch import BatchServing
from deployments.serving.core import ServingCore

logger = logging.getLogger("ray.serve")

T = TypeVar("T")
LINES_PER_READ = 256


def batch_concurrency(model: ModelConfig, config: AppConfig) -> int:
    """Lines in flight for ``model``: the configured number, or half of what its replicas take at
    once (the other half stays free for interactive requests)."""
    from deployments.replica import model_deployment_options

    if config.batch.concurrency is not None:
        return config.batch.concurrency
    options = model_deployment_options(model, config.cache_dir)
    replicas = options.get("num_replicas") or (options.get("autoscaling_config") or {}).get("max_replicas") or 1
    return max(1, options["max_ongoing_requests"] * replicas // 2)


def runner_deployment_options(config: AppConfig) -> dict[str, Any]:
    """Serve options of the runner: one replica (it owns the store), on the data path the router uses."""
    defaults = {"num_replicas": 1, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.25}}
    return config.batch.deployment.serve_options(defaults, C.SERVE_DATA_PATH_ENV)


def _is_retryable(error: ServeError) -> bool:
    """Errors a later attempt may not meet: full queues, a model still starting, a replica that died."""
    return error.status_code == 503 or error.code == "replica_died"


class BatchRunner:
    def __init__(self, config: dict[str, Any], models: dict[str, DeploymentHandle]) -> None:
        app_config = AppConfig.model_validate(config)
        self._config = app_config.batch
        self._store = Store(self._config.database, self._config.files_uri)
        self._serving = BatchServing(ServingCore(app_config, models))
        limits = {m.name: batch_concurrency(m, app_config) for m in app_config.models}
        self._slots = {name: asyncio.Semaphore(limit) for name, limit in limits.items()}
        self._window = sum(limits.values())  # lines read ahead per batch
        self._db = ThreadPoolExecutor(1, thread_name_prefix="batch-store")  # SQLite: one writer
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._started = asyncio.get_running_loop().create_task(self._resume())

    async def _io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` on the store's thread: SQLite and file I/O block."""
        return await asyncio.get_running_loop().run_in_executor(self._db, functools.partial(fn, *args, **kwargs))

    async def _resume(self) -> None:
        for batch in await self._io(self._store.unfinished_batches):
            logger.info("resuming batch %s (%s)", batch["id"], batch["status"])
            self._start(batch["id"])

    def _start(self, batch_id: str) -> None:
        self._jobs[batch_id] = task = asyncio.get_running_loop().create_task(self._run(batch_id))
        task.add_done_callback(lambda _: self._jobs.pop(batch_id, None) if self._jobs.get(batch_id) is task else None)

    async def check_health(self) -> None:
        if self._started.done() and (error := self._started.exception()) is not None:
            raise RuntimeError(f"resuming unfinished batches failed: {error!r}")

    # -- files ---------------------------------------------------------------------------

    async def create_file(self, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        if purpose != "batch":
            raise InvalidRequest(
                f"purpose: {purpose!r} is not served; files here are inputs of batches (purpose batch)"
            )
        if len(data) > self._config.max_file_bytes:
            raise PayloadTooLarge(
                f"file of {len(data)} bytes exceeds batch.max_file_bytes={self._config.max_file_bytes}"
            )
        return await self._io(self._store.add_file, filename, purpose, [data])

    async def file(self, file_id: str) -> dict[str, Any]:
        return await self._io(self._store.file, file_id)

    async def files(self, purpose: str | None, after: str | None, limit: int, order: str) -> dict[str, Any]:
        return (await self._io(self._store.files, purpose, after, limit, order)).body()

    async def file_content(self, file_id: str) -> AsyncIterator[bytes]:
        """The file's bytes, a chunk at a time (call with ``stream=True``)."""
        chunks = await self._io(self._store.read_chunks, file_id)
        while (chunk := await self._io(next, chunks, None)) is not None:
            yield chunk

    async def delete_file(self, file_id: str) -> dict[str, Any]:
        if (batch_id := await self._io(self._store.batch_using, file_id)) is not None:
            raise Conflict(f"file {file_id} is the input of batch {batch_id}, which is not finished; cancel it first")
        return await self._io(self._store.delete_file, file_id)

    # -- batches -------------------------------------------------------------------------

    async def create_batch(self, request: dict[str, Any]) -> dict[str, Any]:
        body = BatchCreateRequest.model_validate(request)
        file = await self._io(self._store.file, body.input_file_id)
        if file["purpose"] != "batch":
            raise InvalidRequest(f"input_file_id: file {file['id']} has purpose {file['purpose']}, not batch")
        batch = await self._io(
            self._store.add_batch,
            body.endpoint,
            body.input_file_id,
            body.completion_window,
            C.BATCH_COMPLETION_WINDOW_S,
            body.metadata,
        )
        self._start(batch["id"])
        return batch

    async def batch(self, batch_id: str) -> dict[str, Any]:
        return await self._io(self._store.batch, batch_id)

    async def batches(self, after: str | None, limit: int) -> dict[str, Any]:
        return (await self._io(self._store.batches, after, limit)).body()

    async def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        batch = await self._io(self._store.batch, batch_id)
        status = BatchStatus(batch["status"])
        if status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
            return batch
        if status.finished or status is BatchStatus.FINALIZING:
            raise Conflict(f"batch {batch_id} is {status}; only a validating or in-progress batch can be cancelled")
        batch = await self._io(self._store.set_status, batch_id, BatchStatus.CANCELLING)
        job = self._jobs.get(batch_id)
        if job is not None:  # its lines in flight are cancelled, in the engines too
            job.cancel()
            await asyncio.gather(job, return_exceptions=True)
        self._start(batch_id)  # finalizes it as cancelled
        return batch

    # -- running a batch -----------------------------------------------------------------

    async def _run(self, batch_id: str) -> None:
        try:
            batch = await self._io(self._store.batch, batch_id)
            status = BatchStatus(batch["status"])
            if status is BatchStatus.VALIDATING:
                batch = await self._validate(batch)
                status = BatchStatus(batch["status"])
            if status is BatchStatus.IN_PROGRESS:
                status = await self._run_lines(batch)
                await self._finalize(batch, status)
            elif status is BatchStatus.FINALIZING:
                await self._finalize(batch, BatchStatus.COMPLETED)
            elif status is BatchStatus.CANCELLING:
                await self._finalize(batch, BatchStatus.CANCELLED)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("batch %s failed", batch_id)
            error = as_serve_error(exc)
            errors = [{"code": error.code, "message": f"the batch runner failed: {error.message}", "param": None,
                       "line": None}]  # fmt: skip
            await self._io(self._store.set_status, batch_id, BatchStatus.FAILED, errors=errors)

    async def _validate(self, batch: dict[str, Any]) -> dict[str, Any]:
        def scan() -> Any:
            return scan_input(
                self._store.read_lines(batch["input_file_id"]), batch["endpoint"], self._config.max_requests
            )

        result = await asyncio.to_thread(scan)
        if result.errors:
            logger.info("batch %s failed validation: %d problem(s)", batch["id"], result.error_count)
            return await self._io(self._store.set_status, batch["id"], BatchStatus.FAILED, errors=result.errors)
        logger.info("batch %s: %d requests to %s", batch["id"], result.total, batch["endpoint"])
        return await self._io(self._store.set_status, batch["id"], BatchStatus.IN_PROGRESS, total=result.total)

    async def _input_lines(self, file_id: str) -> AsyncIterator[tuple[int, bytes]]:
        """(1-based line number, line) of an input file, read off the event loop."""
        lines: Iterator[tuple[int, bytes]] = enumerate(self._store.read_lines(file_id), start=1)
        while page := await asyncio.to_thread(list, itertools.islice(lines, LINES_PER_READ)):
            for number, raw in page:
                if raw.strip():
                    yield number, raw

    async def _run_lines(self, batch: dict[str, Any]) -> BatchStatus:
        """Run every line without a result; COMPLETED, or EXPIRED when the window closes first
        (the lines still running then are stopped, in the engines too)."""
        done = await self._io(self._store.done_lines, batch["id"])
        window = asyncio.Semaphore(self._window)
        tasks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(loop.time() + batch["expires_at"] - time.time()):
                async for number, raw in self._input_lines(batch["input_file_id"]):
                    if number in done:
                        continue
                    await window.acquire()
                    task = asyncio.create_task(self._run_line(batch, number, raw))
                    tasks.add(task)
                    task.add_done_callback(lambda t: (tasks.discard(t), window.release()))
                await asyncio.gather(*tasks)
        except TimeoutError:
            return BatchStatus.EXPIRED
        finally:
            for task in tasks:
                task.cancel()
        return BatchStatus.COMPLETED

    async def _run_line(self, batch: dict[str, Any], number: int, raw: bytes) -> None:
        line = parse_line(raw)
        request_id = new_id("batch_req_")
        model = line.body.get("model")
        known = isinstance(model, str) and model in self._slots
        status, body = await self._answer(
            batch["endpoint"], line.body, request_id, self._slots[model] if known else None
        )
        output = line_output(line.custom_id, request_id, status, body)
        await self._io(self._store.add_result, batch["id"], number, line.custom_id, status < 300, output)
        outcome = "ok" if status < 300 else "failed"
        router_metrics().batch_lines.inc(tags={"model": model if known else "unknown", "outcome": outcome})

    async def _answer(
        self, endpoint: str, body: dict[str, Any], request_id: str, slots: asyncio.Semaphore | None
    ) -> tuple[int, dict[str, Any]]:
        """(status, body) of one line, retrying what a later attempt may not meet."""
        for attempt in range(C.BATCH_LINE_ATTEMPTS):
            try:
                if slots is None:  # no such model: its error needs no slot
                    return 200, await self._serving.answer(endpoint, body, request_id)
                async with slots:
                    return 200, await self._serving.answer(endpoint, body, request_id)
            except Exception as exc:
                error = as_serve_error(exc)
                if not _is_retryable(error) or attempt + 1 == C.BATCH_LINE_ATTEMPTS:
                    return error.status_code, error.to_body()
                logger.info("batch line %s: %s (%s); retrying", request_id, error.code, error.message)
                await asyncio.sleep(C.BATCH_RETRY_BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

    async def _finalize(self, batch: dict[str, Any], status: BatchStatus) -> None:
        """Write the output and error files, then enter the final ``status``. Rerun after a crash,
        it writes the same files again under the same ids."""
        batch_id = batch["id"]
        if status is BatchStatus.COMPLETED:
            batch = await self._io(self._store.set_status, batch_id, BatchStatus.FINALIZING)
        done = await self._io(self._store.done_lines, batch_id)

        def not_run() -> Iterator[bytes]:
            if status is BatchStatus.COMPLETED:
                return
            code, why = ("batch_expired", "the batch expired") if status is BatchStatus.EXPIRED else (
                "batch_cancelled", "the batch was cancelled")  # fmt: skip
            if batch["in_progress_at"] is None:  # cancelled before its file was checked: no lines to name
                return
            for number, raw in enumerate(self._store.read_lines(batch["input_file_id"]), start=1):
                if raw.strip() and number not in done:
                    yield line_not_run(parse_line(raw).custom_id, code, f"{why} before this request ran")

        def write(kind: str, chunks: Iterator[bytes]) -> str | None:
            first = next(chunks, None)
            if first is None:
                return None
            file_id = "file-" + uuid.uuid5(uuid.NAMESPACE_URL, f"{batch_id}/{kind}").hex
            return self._store.add_file(f"{batch_id}_{kind}.jsonl", "batch_output", itertools.chain([first], chunks),
                                        file_id)["id"]  # fmt: skip

        output = await asyncio.to_thread(write, "output", self._store.results(batch_id, ok=True))
        errors = await asyncio.to_thread(
            write, "error", itertools.chain(self._store.results(batch_id, ok=False), not_run())
        )
        final = await self._io(self._store.set_status, batch_id, status, output_file_id=output, error_file_id=errors)
        counts = final["request_counts"]
        logger.info("batch %s %s: %d completed, %d failed of %d", batch_id, status, counts["completed"],
                    counts["failed"], counts["total"])  # fmt: skip
