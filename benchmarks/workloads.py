"""The same prompts, images and output length for every system.

Random-weight models end at random, so every request fixes its output length: our API and
vLLM's take ``ignore_eos``; llama-cpp-python's server takes a logit bias against the EOS token,
which is what our llama.cpp engine applies for ``ignore_eos``.
"""

from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

MAX_TOKENS = 128
SAMPLING = {"temperature": 0.7, "top_p": 0.95, "seed": 1234}
VOCABULARY = (
    "river stone lantern orbit maple signal harbor copper meadow engine violet canyon ember "
    "glacier thread compass quartz willow beacon prairie falcon velvet summit tide ledger"
)


@dataclass(frozen=True, slots=True)
class Workload:
    """``n`` chat requests for ``model``: distinct prompts (no shared KV prefix beyond the template)."""

    model: str
    prompts: tuple[str, ...]
    max_tokens: int = MAX_TOKENS
    image: str | None = None  # a data: URL sent with every prompt

    def warmup(self) -> Workload:
        """One request of the same shape with a prompt of its own (no KV-cache hit later)."""
        return replace(self, prompts=("Warm-up: " + self.prompts[0],))

    def messages(self, prompt: str) -> list[dict[str, Any]]:
        if self.image is None:
            return [{"role": "user", "content": prompt}]
        parts = [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": self.image}}]
        return [{"role": "user", "content": parts}]

    def payloads(self, eos_logit_bias: int | None = None, **extra: Any) -> list[dict[str, Any]]:
        """The streaming requests, fixed-length by ``ignore_eos`` (ours, vLLM) or, for
        llama-cpp-python's server, by a logit bias against the EOS token ``eos_logit_bias``."""
        if eos_logit_bias is not None:
            fixed: dict[str, Any] = {"logit_bias": {str(eos_logit_bias): -100.0}}
        else:
            fixed = {"ignore_eos": True, "stream_options": {"include_usage": True}}
        return [
            {"model": self.model, "messages": self.messages(p), "max_tokens": self.max_tokens, "stream": True}
            | SAMPLING
            | fixed
            | extra
            for p in self.prompts
        ]


def prompts(n: int, words: int = 48, seed: int = 0) -> tuple[str, ...]:
    rng = random.Random(seed)
    return tuple(f"Request {i}: " + " ".join(rng.choices(VOCABULARY.split(), k=words)) for i in range(n))


def image_data_url(size: int = 64, seed: int = 0) -> str:
    """A small noisy PNG: the tiny VLM's processor resizes it like any other image."""
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (size, size), bytes(rng.randrange(256) for _ in range(size * size * 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def requests_per_level(concurrency: int, quick: bool) -> int:
    """Enough requests that every slot is busy through most of the run."""
    return max(4, concurrency * (1 if quick else 2))
