"""``POST /tokenize`` and ``POST /detokenize``: vLLM's shapes, with llama-server's fields beside them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from deployments.protocol.chat import ChatMessage
from deployments.protocol.common import Strict
from deployments.tools import Tool

MODEL_FIELD = Field(
    default=None, description="Whose tokenizer; may be left out when the app serves one model (llama-server's way)."
)


class TokenizeRequest(Strict):
    """Text as it is (vLLM's ``prompt``, llama-server's ``content``), or messages through the
    model's chat template, with the generation prompt, as a chat completion starts."""

    model: str | None = MODEL_FIELD
    prompt: str | None = None
    content: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    tools: list[Tool] | None = None
    add_generation_prompt: Literal[True] = True
    add_special_tokens: bool | None = Field(default=None, description="vLLM's flag (default true) for a prompt.")
    add_special: bool | None = Field(default=None, description="llama-server's flag (default false) for content.")

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if sum(x is not None for x in (self.prompt, self.content, self.messages)) != 1:
            raise PydanticCustomError("input", "one of prompt, content or messages: what to tokenize")
        if self.tools and self.messages is None:
            raise PydanticCustomError("tools", "tools: only with messages (the chat template renders them)")
        return self

    @property
    def text(self) -> str | None:
        return self.prompt if self.prompt is not None else self.content

    @property
    def special(self) -> bool:
        """Whether raw text gets the model's opening special tokens, each API's default."""
        if self.add_special_tokens is not None:
            return self.add_special_tokens
        return self.add_special if self.add_special is not None else self.content is None


class DetokenizeRequest(Strict):
    model: str | None = MODEL_FIELD
    tokens: list[int]


def tokenize_body(tokens: list[int], max_model_len: int) -> dict[str, Any]:
    """vLLM's answer; llama-server's (``tokens``) is part of it."""
    return {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens}


def detokenize_body(text: str) -> dict[str, Any]:
    """vLLM's ``prompt`` and llama-server's ``content``: the same text."""
    return {"prompt": text, "content": text}
