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
import math
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


async def _next(stream: AsyncIterator[T]) -> T:
    return await anext(stream)


async def coalesce(
    stream: AsyncIterator[T], interval_s: float, merge: Callable[[Sequence[T]], T]
) -> AsyncIterator[T]:
    """Yield ``stream``'s items, merging those that arrive within ``interval_s`` of the last yield.

    An item that arrives after a quiet interval goes out at once (the first one always does);
    one that arrives sooner waits for the interval to end, with everything that joins it. The
    stream's end flushes at once. Closing this generator cancels a pending read of ``stream``
    and waits for it, so the source's own clean-up (stopping the engine) has run on return.
    """
    if interval_s <= 0:
        async for item in stream:
            yield item
        return
    loop = asyncio.get_running_loop()
    buffer: list[T] = []
    flush_at = -math.inf  # loop time from which an arriving item goes out at once
    pending: asyncio.Task[T] | None = None  # a read of `stream` outliving a flush timer
    try:
        while True:
            if not buffer and pending is None:
                item = await anext(stream)
            else:
                pending = pending or asyncio.create_task(_next(stream))
                if buffer:
                    done, _ = await asyncio.wait((pending,), timeout=flush_at - loop.time())
                    if not done:  # the interval is over: send what waited, keep reading
                        yield merge(buffer)
                        buffer, flush_at = [], loop.time() + interval_s
                        continue
                read, pending = pending, None
                item = await read
            buffer.append(item)
            if loop.time() >= flush_at:
                yield merge(buffer)
                buffer, flush_at = [], loop.time() + interval_s
    except StopAsyncIteration:
        if buffer:
            yield merge(buffer)
    except Exception:
        if buffer:  # what was generated before the failure still reaches the caller
            yield merge(buffer)
        raise
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.wait((pending,))
            if not pending.cancelled():
                pending.exception()  # the caller has gone: its error has nowhere to go
