"""``POST /tokenize`` and ``POST /detokenize``: the model's own tokenizer and chat template, in its replicas."""

from __future__ import annotations

from typing import Any

from deployments.engines.base import Prompt
from deployments.protocol.tokenize import DetokenizeRequest, TokenizeRequest, detokenize_body, tokenize_body
from deployments.serving.core import ServingCore


class TokenizeServing:
    def __init__(self, core: ServingCore) -> None:
        self._core = core

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        model = self._core.any_model(body.model)
        prompt = Prompt(
            prompt=body.text,
            messages=tuple(m.engine_message() for m in body.messages or ()),
            tools=tuple(t.model_dump(exclude_none=True) for t in body.tools or ()),
        )
        timeout = model.deadlines.default.request_timeout_s
        tokens = await self._core.call(model, "tokenize", prompt, body.special, timeout_s=timeout)
        return tokenize_body(tokens, model.context_size)

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        model = self._core.any_model(body.model)
        timeout = model.deadlines.default.request_timeout_s
        return detokenize_body(await self._core.call(model, "detokenize", body.tokens, timeout_s=timeout))
