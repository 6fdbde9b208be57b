"""Sampled token bytes to client text: whole UTF-8 characters only, stop strings cut and never sent.

One :class:`TextStream` per sequence. Per token it costs one incremental decode and a search of
the few characters that could begin a stop string, so it stays off the step's critical path.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    """Turns the byte pieces of sampled tokens into text that is safe to send.

    Text is held back only while it could be the start of a stop string, or the first bytes of
    a multi-byte character; a stop string ends the stream and neither it nor anything after it
    is ever returned.
    """

    __slots__ = ("_decoder", "_pending", "_stops", "stop")

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(stops)
        self._pending = ""  # decoded, held back: it may begin a stop string
        self.stop: str | None = None  # the stop string that ended the stream

    @property
    def stopped(self) -> bool:
        return self.stop is not None

    def push(self, piece: bytes) -> str:
        """Add a token's bytes; return the text that may be sent now (sets ``stopped`` on a stop string)."""
        if self.stopped:
            return ""
        text = self._pending + self._decoder.decode(piece)
        if not self._stops:
            return text
        found = [(i, stop) for stop in self._stops if (i := text.find(stop)) >= 0]
        if found:
            cut, self.stop = min(found)
            self._pending = ""
            return text[:cut]
        keep = self._partial_stop_length(text)
        self._pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The rest at the end of the generation (a partial stop string is text after all)."""
        if self.stopped:
            return ""
        text, self._pending = self._pending + self._decoder.decode(b"", final=True), ""
        return text

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest end of ``text`` that is the beginning of a stop string."""
        longest = min(len(text), max(len(stop) for stop in self._stops) - 1)
        for length in range(longest, 0, -1):
            tail = text[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0
