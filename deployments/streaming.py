"""Deadlines around async streams: one implementation for every path.

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
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Callable
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
