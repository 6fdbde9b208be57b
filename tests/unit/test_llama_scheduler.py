"""The scheduler's policies that need no llama.cpp: which free slot a prompt takes, and the passes a batch costs."""

from __future__ import annotations

from deployments.engines.llama_scheduler import Scheduler, Slot, stream_passes

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


def test_one_run_of_consecutive_sequences_decodes_in_one_pass() -> None:
    assert stream_passes({0: 1, 1: 1, 2: 1, 3: 1}, 512) == 1


def test_a_gap_in_the_sequence_ids_costs_a_pass_per_run() -> None:
    assert stream_passes({0: 1, 1: 1, 3: 1, 4: 1, 7: 1}, 512) == 3


def test_a_prompt_chunk_beside_decoding_sequences_takes_a_pass_of_its_own() -> None:
    # split_equal takes the same number of tokens from each sequence of a ubatch
    assert stream_passes({0: 1, 1: 1, 2: 100}, 512) == 2
    assert stream_passes({2: 100}, 512) == 1
    assert stream_passes({2: 100}, 64) == 2


def test_sequences_out_of_order_in_the_batch_still_join_their_run() -> None:
    assert stream_passes({3: 1, 1: 1, 4: 1, 2: 1}, 512) == 2  # {3, 4}, then {1, 2}
