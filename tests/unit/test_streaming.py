"""The deadline helper, on plain async generators (no Ray)."""

import asyncio
from collections.abc import AsyncIterator

import pytest

from deployments.config import Deadlines
from deployments.errors import InferenceTimeout
from deployments.streaming import with_deadlines


async def ticking(delays: list[float]) -> AsyncIterator[int]:
    for i, delay in enumerate(delays):
        await asyncio.sleep(delay)
        yield i


async def drain(stream: AsyncIterator[int]) -> list[int]:
    return [item async for item in stream]


def run(deadlines: Deadlines, delays: list[float]) -> list[int]:
    return asyncio.run(drain(with_deadlines(ticking(delays), deadlines)))


def test_passes_items_through_when_no_deadline_fires() -> None:
    assert run(Deadlines(first_chunk_timeout_s=1, chunk_timeout_s=1, request_timeout_s=5), [0, 0.01, 0.01]) == [0, 1, 2]


@pytest.mark.parametrize(
    ("deadlines", "delays", "code"),
    [
        (Deadlines(first_chunk_timeout_s=0.05), [1.0], "first_chunk_timeout"),
        (Deadlines(first_chunk_timeout_s=1, chunk_timeout_s=0.05), [0, 0, 1.0], "chunk_timeout"),
        (Deadlines(chunk_timeout_s=0.2, request_timeout_s=0.3), [0.1] * 10, "request_timeout"),
        # The tightest deadline names the error: the total is nearer than the idle bound.
        (Deadlines(first_chunk_timeout_s=5, request_timeout_s=0.05), [1.0], "request_timeout"),
    ],
)
def test_the_deadline_that_fires_names_itself(deadlines: Deadlines, delays: list[float], code: str) -> None:
    with pytest.raises(InferenceTimeout) as info:
        run(deadlines, delays)
    assert info.value.code == code
    assert info.value.status_code == 504
    assert f"{code}_s" in info.value.message


def test_a_long_stream_of_timely_chunks_exceeds_the_chunk_deadline_in_total() -> None:
    # 20 chunks 20 ms apart = 400 ms in total, far beyond the 150 ms idle bound.
    assert len(run(Deadlines(first_chunk_timeout_s=1, chunk_timeout_s=0.15), [0.02] * 20)) == 20


def test_on_expire_runs_before_the_error_and_the_source_is_left_unconsumed() -> None:
    calls: list[str] = []

    async def main() -> None:
        source = ticking([0, 1.0, 0])
        with pytest.raises(InferenceTimeout):
            async for _ in with_deadlines(source, Deadlines(chunk_timeout_s=0.05), lambda: calls.append("expired")):
                pass

    asyncio.run(main())
    assert calls == ["expired"]


def test_a_timeout_error_raised_by_the_source_is_not_mistaken_for_a_deadline() -> None:
    async def failing() -> AsyncIterator[int]:
        yield 0
        raise TimeoutError("upstream")

    with pytest.raises(TimeoutError, match="upstream"):
        asyncio.run(drain(with_deadlines(failing(), Deadlines(chunk_timeout_s=5))))
