"""Finished prompts' KV state in host memory, for a later request with the same prefix.

llama-server's ``--cache-ram`` and ``--cache-idle-slots``: the KV pool holds the running
sequences, so every decode step attends over a short span of cells (in a unified pool a query
visits every used cell up to the highest, whichever sequence owns it: cached prompts in the pool
slow every running stream). When a request is admitted, the prompts that idle slots still hold are
copied here (``llama_state_seq_get_data``, ~12 KiB a token for the medium demo model) and leave
the pool; one is copied back into a slot when a new prompt starts with enough of it: far cheaper
than prefilling it again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(frozen=True, slots=True)
class CachedPrompt:
    """Tokens in position order and their sequence state, as ``llama_state_seq_get_data`` wrote it."""

    tokens: tuple[int, ...]
    state: np.ndarray  # bytes


class PromptCache:
    """Least recently used first out, within ``limit_bytes``; an entry leaves when it is taken."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple[int, ...], CachedPrompt] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def fits(self, size: int) -> bool:
        return size <= self.limit_bytes

    def put(self, entry: CachedPrompt) -> None:
        """Keep ``entry``; entries it extends (an earlier turn of the same chat) go, as do the oldest."""
        if not self.fits(len(entry.state)):
            return
        for tokens in [t for t in self._entries if entry.tokens[: len(t)] == t]:
            self._drop(tokens)
        while self.bytes + len(entry.state) > self.limit_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[entry.tokens] = entry
        self.bytes += len(entry.state)

    def touch(self, tokens: Sequence[int]) -> bool:
        """Whether an entry holds exactly ``tokens``; it becomes the most recently used."""
        key = tuple(tokens)
        if key not in self._entries:
            return False
        self._entries.move_to_end(key)
        return True

    def longest_prefix(self, prompt: list[int]) -> tuple[CachedPrompt | None, int]:
        """The entry sharing the longest prefix with ``prompt``, and that length."""
        best, shared = None, 0
        for entry in self._entries.values():
            n = common_prefix(entry.tokens, prompt)
            if n > shared:
                best, shared = entry, n
        return best, shared

    def take(self, entry: CachedPrompt) -> None:
        """``entry`` goes back into a slot: the slot holds it now, and returns it here when overwritten."""
        self._drop(entry.tokens)

    def _drop(self, tokens: tuple[int, ...]) -> None:
        self.bytes -= len(self._entries.pop(tokens).state)
