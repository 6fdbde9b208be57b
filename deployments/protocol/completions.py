"""``POST /v1/completions``: text in, text out, no chat template."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, PositiveInt, model_validator
from pydantic_core import PydanticCustomError

from deployments import constants as C
from deployments.engines.base import TokenLogprob, Usage
from deployments.protocol.common import Chunks, GenerationFields, completion_object


class CompletionRequest(GenerationFields):
    """``POST /v1/completions``: text in, text out, no chat template. A list of prompts gets
    a choice per prompt (times ``n``), as OpenAI's ``index`` orders them."""

    UNSUPPORTED_FIELDS = ("suffix",)

    prompt: str | list[str] = Field(min_length=1)
    max_tokens: PositiveInt | None = Field(default=16, description="OpenAI's default for text completions.")
    echo: bool = Field(default=False, description="Put the prompt before the generated text.")
    best_of: Literal[1] | None = None
    logprobs: int | None = Field(default=None, ge=0, le=C.MAX_COMPLETION_LOGPROBS)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            raise PydanticCustomError("echo", "echo with logprobs: not supported by this server (no prompt logprobs)")
        return self


class TextChunkFactory(Chunks):
    """``text_completion`` chunks (``/v1/completions`` streams)."""

    __slots__ = ()
    OBJECT = "text_completion"

    def chunk(
        self, index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None
    ) -> dict[str, Any]:
        return self._chunk([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}])


def legacy_logprobs(logprobs: Sequence[TokenLogprob], text_offset: int) -> dict[str, Any]:
    """Text completions' logprobs: parallel lists, offsets into the choice's text from ``text_offset``."""
    tokens = [lp.token.decode("utf-8", errors="replace") for lp in logprobs]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [max(lp.logprob, -9999.0) for lp in logprobs],
        "top_logprobs": [{t.decode("utf-8", errors="replace"): max(p, -9999.0) for t, p in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def text_completion_body(completion_id: str, model: str, choices: list[dict[str, Any]], usage: Usage) -> dict[str, Any]:
    return completion_object("text_completion", completion_id, model, choices, usage)
