"""The deadline and coalescing helpers, on plain async generators (no Ray)."""

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from deployments.config import Deadlines
from deployments.errors import InferenceTimeout
from deployments.streaming import coalesce, coalescing_window, with_deadlines


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


# -- coalescing ---------------------------------------------------------------------------


def join(items: Sequence[str]) -> str:
    return "".join(items)


async def burst(items: str, then: asyncio.Event | None = None, more: str = "") -> AsyncIterator[str]:
    """``items`` at once, then (after ``then`` is set) ``more`` at once."""
    for item in items:
        yield item
    if then is not None:
        await then.wait()
    for item in more:
        yield item


def collect(stream: AsyncIterator[str], bound_s: float = 5) -> list[str]:
    async def main() -> list[str]:
        return await asyncio.wait_for(drain(stream), bound_s)

    return asyncio.run(main())


def test_interval_zero_passes_every_item_alone() -> None:
    assert collect(coalesce(burst("abc"), 0, join)) == ["a", "b", "c"]


def test_the_first_item_goes_alone_and_the_waiting_rest_in_one_chunk() -> None:
    # Ten items at once; the stream ends long before the 10 s interval: its end flushes at once.
    assert collect(coalesce(burst("abcdefghij"), 10, join), bound_s=2) == ["a", "bcdefghij"]


def test_items_slower_than_the_interval_each_go_at_once() -> None:
    async def slow() -> AsyncIterator[str]:
        for item in "abc":
            await asyncio.sleep(0.05)
            yield item

    assert collect(coalesce(slow(), 0.001, join)) == ["a", "b", "c"]


def test_the_interval_flushes_waiting_items_while_the_source_is_silent() -> None:
    async def main() -> list[str]:
        resume = asyncio.Event()
        chunks = coalesce(burst("abc", then=resume, more="de"), 0.05, join)
        first, second = await anext(chunks), await anext(chunks)  # "bc" comes without "d" and "e"
        resume.set()
        return [first, second, *[c async for c in chunks]]

    assert asyncio.run(asyncio.wait_for(main(), 5)) == ["a", "bc", "de"]


def test_closing_mid_stream_cancels_the_pending_read_and_runs_the_source_clean_up() -> None:
    events: list[str] = []

    async def source() -> AsyncIterator[str]:
        try:
            yield "a"
            yield "b"
            await asyncio.Event().wait()  # never produces again
            yield "c"
        except asyncio.CancelledError:
            events.append("cancelled")
            raise
        finally:
            events.append("closed")

    async def main() -> list[str]:
        chunks = coalesce(source(), 0.05, join)
        received = [await anext(chunks), await anext(chunks)]  # "b" by the interval, a read pending
        await chunks.aclose()
        return received

    assert asyncio.run(asyncio.wait_for(main(), 5)) == ["a", "b"]
    assert events == ["cancelled", "closed"]  # the source's clean-up had run when aclose returned


def test_items_before_a_failure_reach_the_caller_before_the_error() -> None:
    async def failing() -> AsyncIterator[str]:
        yield "a"
        yield "b"
        raise RuntimeError("engine failed")

    received: list[str] = []

    async def main() -> None:
        async for chunk in coalesce(failing(), 10, join):
            received.append(chunk)

    with pytest.raises(RuntimeError, match="engine failed"):
        asyncio.run(asyncio.wait_for(main(), 2))
    assert received == ["a", "b"]


@pytest.mark.parametrize(
    ("interval_s", "chunk_timeout_s", "window_s"),
    [(0.05, None, 0.05), (0.05, 30.0, 0.05), (0.05, 0.04, 0.02), (0.0, 0.04, 0.0)],
)
def test_the_coalescing_window_stays_within_half_the_chunk_deadline(
    interval_s: float, chunk_timeout_s: float | None, window_s: float
) -> None:
    assert coalescing_window(interval_s, Deadlines(chunk_timeout_s=chunk_timeout_s)) == pytest.approx(window_s)
