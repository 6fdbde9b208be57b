"""Deadlines and coalescing around async streams: one implementation for every path.

Ray Serve's own request timeout bounds only the time to the first chunk; ours bounds every
chunk. :func:`with_deadlines` wraps any async iterator (a Serve streaming handle response,
an engine stream) and enforces three deadlines:

- ``first_chunk_timeout_s``: until the first item (queueing and prompt processing);
- ``chunk_timeout_s``: idle time between consecutive items;
- ``request_timeout_s``: the whole stream.

Each wait gets the tightest of the deadlines that apply to it, so the error names the one
that actually fired. When one fires, ``on_expire`` runs first (it cancels the upstream work
so the engine stops) and :class:`~deployments.errors.InferenceTimeout` is raised with the
deadline's name as its ``code``.

:func:`coalesce` merges the items of a fast stream into at most one chunk per interval, so
that each hop downstream (replica -> router -> HTTP proxy -> client) pays its per-chunk cost
once for several tokens. It never delays the first item, and never holds an item longer than
the interval; :func:`coalescing_window` keeps the interval well inside the chunk deadline.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeVar

from deployments.config import Deadlines
from deployments.errors import InferenceTimeout

T = TypeVar("T")


class DeadlineKind(enum.StrEnum):
    FIRST_CHUNK = "first_chunk_timeout"
    CHUNK = "chunk_timeout"
    REQUEST = "request_timeout"


def _describe(kind: DeadlineKind, seconds: float) -> str:
    what = {
        DeadlineKind.FIRST_CHUNK: "no first token within",
        DeadlineKind.CHUNK: "no new token within",
        DeadlineKind.REQUEST: "the request did not finish within",
    }[kind]
    return f"{what} {seconds:g}s ({kind.value}_s); raise it in the request or the model's deadlines config"


async def with_deadlines(
    stream: AsyncIterator[T], deadlines: Deadlines, on_expire: Callable[[], object] | None = None
) -> AsyncIterator[T]:
    """Yield from ``stream`` under ``deadlines``; raise ``InferenceTimeout`` when one fires."""
    loop = asyncio.get_running_loop()
    total_s = deadlines.request_timeout_s
    request_at = loop.time() + total_s if total_s else None
    idle_kind, idle_s = DeadlineKind.FIRST_CHUNK, deadlines.first_chunk_timeout_s
    while True:  # per chunk: only the idle deadline moves; pick the nearer of the two
        idle_at = loop.time() + idle_s if idle_s else None
        if idle_at is not None and (request_at is None or idle_at < request_at):
            expires_at, kind, seconds = idle_at, idle_kind, idle_s
        else:
            expires_at, kind, seconds = request_at, DeadlineKind.REQUEST, total_s
        timer = asyncio.timeout_at(expires_at)
        try:
            async with timer:
                item = await anext(stream)
        except StopAsyncIteration:
            return
        except TimeoutError:
            if not timer.expired():  # raised by the stream itself, not by our deadline
                raise
            if on_expire is not None:
                on_expire()
            raise InferenceTimeout(_describe(kind, seconds), code=kind.value) from None
        yield item
        idle_kind, idle_s = DeadlineKind.CHUNK, deadlines.chunk_timeout_s


# Coalescing may hold tokens back for at most this share of the chunk deadline: the router's
# chunk deadline then never fires on a stream whose engine is producing tokens.
CHUNK_DEADLINE_SHARE = 0.5


def coalescing_window(interval_s: float, deadlines: Deadlines) -> float:
    """The interval to coalesce a stream with: the configured one, within the chunk deadline."""
    if deadlines.chunk_timeout_s is None:
        return interval_s
    return min(interval_s, deadlines.chunk_timeout_s * CHUNK_DEADLINE_SHARE)


async def coalesce(stream: AsyncIterator[T], interval_s: float, merge: Callable[[Sequence[T]], T]) -> AsyncIterator[T]:
    """Yield ``stream``'s items, merging those that arrive within ``interval_s`` of the last yield.

    The first item goes out at once, and so does one that arrives after a quiet interval; one
    that arrives sooner waits for the interval to end, with everything that joins it. The
    stream's end flushes at once. One reader task per stream fills the buffer, so the per-item
    cost is an append; timers are per chunk. Closing this generator cancels the reader and waits
    for it, so the source's own clean-up (stopping the engine) has run on return.
    """
    if interval_s <= 0:
        async for item in stream:
            yield item
        return
    try:
        yield await anext(stream)
    except StopAsyncIteration:
        return
    loop = asyncio.get_running_loop()
    flush_at = loop.time() + interval_s
    buffer: list[T] = []
    arrived = asyncio.Event()

    async def read() -> None:
        try:
            async for item in stream:
                buffer.append(item)
                arrived.set()
        finally:
            arrived.set()  # the end or a failure wakes the writer too

    reader = asyncio.create_task(read())
    try:
        while not reader.done() or buffer:
            await arrived.wait()
            if flush_at > loop.time():  # inside the interval: gather until it ends or the stream does
                await asyncio.wait((reader,), timeout=flush_at - loop.time())
            arrived.clear()
            if buffer:
                chunk = merge(buffer)
                buffer.clear()
                yield chunk
                flush_at = loop.time() + interval_s
        reader.result()  # the stream's failure, after what it generated reached the caller
    finally:
        reader.cancel()
        await asyncio.wait((reader,))
        if not reader.cancelled():
            reader.exception()  # retrieved: on an early close its error has nowhere to go
