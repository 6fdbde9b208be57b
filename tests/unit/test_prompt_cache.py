"""The host-memory prompt cache: what it keeps, what it finds, what it lets go (no llama.cpp needed)."""

from __future__ import annotations

import numpy as np

from deployments.engines.prompt_cache import CachedPrompt, PromptCache, common_prefix


def entry(tokens: list[int], size: int = 10) -> CachedPrompt:
    return CachedPrompt(tuple(tokens), np.empty(size, np.uint8))


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix((1, 2), [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


def test_the_longest_shared_prefix_is_found() -> None:
    cache = PromptCache(100)
    cache.put(entry([1, 2, 3, 4]))
    cache.put(entry([1, 2, 7, 8, 9]))
    found, shared = cache.longest_prefix([1, 2, 7, 8, 5])
    assert found is not None and found.tokens == (1, 2, 7, 8, 9) and shared == 4
    assert cache.longest_prefix([9, 9]) == (None, 0)


def test_the_oldest_entries_go_when_the_budget_is_spent() -> None:
    cache = PromptCache(25)
    for first in (10, 20, 30):
        cache.put(entry([first, 1]))
    assert len(cache) == 2 and cache.bytes == 20
    assert cache.longest_prefix([10, 1]) == (None, 0)  # the first one went
    assert cache.longest_prefix([30, 1])[1] == 2


def test_an_entry_larger_than_the_budget_is_not_kept() -> None:
    cache = PromptCache(5)
    cache.put(entry([1, 2, 3]))
    assert len(cache) == 0 and cache.bytes == 0 and not cache.fits(10)


def test_a_later_turn_replaces_the_turns_it_extends() -> None:
    cache = PromptCache(100)
    cache.put(entry([1, 2]))
    cache.put(entry([5, 6]))
    cache.put(entry([1, 2, 3, 4]))  # the same chat, one turn on
    assert len(cache) == 2 and cache.bytes == 20
    found, _ = cache.longest_prefix([1, 2])
    assert found is not None and found.tokens == (1, 2, 3, 4)


def test_a_taken_entry_leaves_the_cache() -> None:
    cache = PromptCache(100)
    kept = entry([1, 2, 3])
    cache.put(kept)
    cache.take(kept)
    assert len(cache) == 0 and cache.bytes == 0


def test_a_prompt_saved_already_is_found_and_kept_longest() -> None:
    cache = PromptCache(25)
    cache.put(entry([10, 1]))
    cache.put(entry([20, 1]))
    assert cache.touch([10, 1]) and not cache.touch([10]) and not cache.touch([10, 1, 2])
    cache.put(entry([30, 1]))  # the budget holds two: the least recently used goes, not the touched one
    assert cache.longest_prefix([10, 1])[1] == 2 and cache.longest_prefix([20, 1]) == (None, 0)
