"""Which free slot a new prompt takes (the scheduler's cache policy; no llama.cpp needed)."""

from __future__ import annotations

from deployments.engines.llama_scheduler import Scheduler, Slot

TEMPLATE = [1, 2, 3]  # every prompt's chat-template opening


def prompt(first: int, n: int = 40) -> list[int]:
    return TEMPLATE + list(range(first, first + n))


def test_a_cache_holding_most_of_the_prompt_is_reused() -> None:
    cached = Slot(0, prompt(100), last_used=5.0)
    free = [Slot(1), cached, Slot(2, prompt(200), last_used=1.0)]
    assert Scheduler._pick_slot(free, [*prompt(100), 7, 8]) is cached


def test_a_template_overlap_alone_takes_an_empty_slot_and_keeps_the_caches() -> None:
    empty = Slot(2)
    free = [Slot(0, prompt(100), last_used=1.0), Slot(1, prompt(200), last_used=2.0), empty]
    assert Scheduler._pick_slot(free, prompt(300)) is empty


def test_without_an_empty_slot_the_least_recently_used_cache_goes() -> None:
    oldest = Slot(1, prompt(200), last_used=1.0)
    free = [Slot(0, prompt(100), last_used=3.0), oldest, Slot(2, prompt(400), last_used=2.0)]
    assert Scheduler._pick_slot(free, prompt(300)) is oldest


def test_a_tenth_of_the_prompt_is_enough_to_reuse() -> None:
    shared = TEMPLATE + [9] * 7  # 10 of a 100-token prompt
    cached = Slot(0, [*shared, 5, 5], last_used=9.0)
    assert Scheduler._pick_slot([Slot(1), cached], shared + [6] * 90) is cached
