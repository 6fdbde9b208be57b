"""A deterministic fake engine: the Serve-level tests run the real router and replica with it.

Each request's last user message is a JSON :class:`Script` saying what the engine does (the
text it streams, delays, a failure, a stall, an ending without its final delta); plain text
streams a fixed reply. Model names script the load: ``broken*`` fails with a non-``ServeError``
exception, ``slow-load*`` takes ``SLOW_LOAD_S``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Literal

from pydantic import BaseModel, ConfigDict

from deployments.config import ModelConfig
from deployments.engines.base import Delta, Engine, GenerationRequest, ModelFacts, Prompt, Usage
from deployments.engines.gguf import LlamaCppEngine
from deployments.errors import InferenceFailed, InvalidRequest, ModelNotLoaded

SLOW_LOAD_S = 30.0


class Script(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[str] = ["Hello", ",", " world"]
    first_delay_s: float = 0.0
    delay_s: float = 0.0
    stall_after: int | None = None  # tokens, then silence until cancelled
    fail_after: int | None = None  # tokens, then ``fail`` raises
    fail: Literal["bug", "engine", "invalid"] = "bug"
    end: Literal["finish", "truncate"] = "finish"  # truncate: end without the final delta
    finish_reason: str = "stop"

    def dump(self) -> str:
        return self.model_dump_json(exclude_defaults=True)


def scripted(script: Script | None = None, **chat: object) -> dict[str, object]:
    """A chat request body whose user message is ``script``."""
    return {"model": "fake", "messages": [{"role": "user", "content": (script or Script()).dump()}], **chat}


class FakeEngine(Engine):
    kind = "gguf"

    @classmethod
    def max_ongoing_requests(cls, config: ModelConfig) -> int:
        return 8

    @classmethod
    def describe(cls, config: ModelConfig) -> ModelFacts:
        return LlamaCppEngine.describe(config)  # what the router reads for it too: a real GGUF header

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self._loaded = False
        self._active = 0
        self.counters = {"started": 0, "finished": 0, "closed_early": 0, "failed": 0, "most_prefilling": 0}
        self._prefilling = 0  # generations before their first token

    async def load(self) -> None:
        if self.config.name.startswith("broken"):
            raise RuntimeError("the weights are corrupt")
        if self.config.name.startswith("slow-load"):
            await asyncio.sleep(SLOW_LOAD_S)
        self._loaded = True

    async def unload(self) -> None:
        self._loaded = False  # running streams see it at their next token

    def active_generations(self) -> int:
        return self._active

    async def layer_types(self) -> dict[str, int]:
        """The fake's counters (the replica's one engine-specific query)."""
        return dict(self.counters)

    async def tokenize(self, prompt: Prompt, add_special: bool = True) -> list[int]:
        """A token per word: the prompt's, or each message's content after its role."""
        if not self._loaded:
            raise ModelNotLoaded(f"model {self.config.name} is not loaded")
        words = (prompt.prompt or "").split() + [w for m in prompt.messages for w in (m["role"], *m["content"].split())]
        return [len(w) for w in words]

    async def detokenize(self, tokens: list[int]) -> str:
        return " ".join("x" * t for t in tokens)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if not self._loaded:
            raise ModelNotLoaded(f"model {self.config.name} is not loaded")
        text = request.messages[-1]["content"]
        script = Script.model_validate_json(text) if text.startswith("{") else Script()
        self._active += 1
        self.counters["started"] += 1
        ended = False
        self._prefilling += 1
        self.counters["most_prefilling"] = max(self.counters["most_prefilling"], self._prefilling)
        prefilling = True
        try:
            await asyncio.sleep(script.first_delay_s)
            self._prefilling -= 1
            prefilling = False
            for i, token in enumerate(script.tokens):
                if i == script.fail_after:
                    self._raise(script.fail)
                if i == script.stall_after:
                    await asyncio.Event().wait()
                if not self._loaded:  # unloaded meanwhile: the stream just stops, as llama.cpp's does
                    break
                if i:
                    await asyncio.sleep(script.delay_s)
                yield Delta(token)
            else:
                if script.end == "finish":
                    usage = Usage(len(text.split()), len(script.tokens))
                    yield Delta("", finish_reason=script.finish_reason, usage=usage)
            ended = True
        except Exception:
            self.counters["failed"] += 1
            ended = True
            raise
        finally:
            if prefilling:
                self._prefilling -= 1
            self._active -= 1
            self.counters["finished" if ended else "closed_early"] += 1
            self.idle_since = time.time() if not self._active else None

    @staticmethod
    def _raise(kind: str) -> None:
        if kind == "bug":
            raise KeyError("secret internal detail")
        if kind == "engine":
            raise InferenceFailed("the fake engine failed")
        raise InvalidRequest("the fake engine refused the request")


def fake_gguf(path: str) -> None:
    """A tiny GGUF file with a header and no tensors: enough for configs and the facts reader."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("fake")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    writer.add_context_length(2048)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
