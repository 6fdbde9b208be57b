"""The serving core and its API classes without Serve: fake handles stand in for the model deployments."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deployments.config import AppConfig, Deadlines
from deployments.engines.base import Delta, ModelFacts, ModelInfo, ModelStatus, Priority, Usage
from deployments.errors import InferenceTimeout, InternalError, InvalidRequest, ModelNotFound, Overloaded
from deployments.protocol.chat import ChatCompletionRequest
from deployments.protocol.completions import CompletionRequest
from deployments.serving.chat import ChatServing
from deployments.serving.completions import CompletionServing
from deployments.serving.core import ServingCore, parse_request
from deployments.serving.models import ModelCatalog
from tests.fakes import fake_gguf


class FakeResponse:
    """A ``DeploymentResponseGenerator``: an async iterator of deltas that can be cancelled."""

    def __init__(self, deltas: list[Delta], gap_s: float = 0.0, fail: BaseException | None = None) -> None:
        self.deltas, self.gap_s, self.fail = deltas, gap_s, fail
        self.cancelled = False
        self._it = self._run()

    async def _run(self) -> AsyncIterator[Delta]:
        for delta in self.deltas:
            await asyncio.sleep(self.gap_s)
            yield delta
        if self.fail is not None:
            raise self.fail

    def __aiter__(self) -> FakeResponse:
        return self

    async def __anext__(self) -> Delta:
        return await anext(self._it)

    def cancel(self) -> None:
        self.cancelled = True


class FakeMethod:
    def __init__(self, handle: FakeHandle) -> None:
        self.handle = handle

    def remote(self, request: Any) -> FakeResponse:
        self.handle.requests.append(request)
        if isinstance(self.handle.script, BaseException):
            raise self.handle.script
        self.handle.response = FakeResponse(**self.handle.script)
        return self.handle.response


class FakeBroadcast:
    def __init__(self, reports: list[Any]) -> None:
        self.reports = reports

    async def results_async(self, timeout_s: float, return_exceptions: bool) -> list[Any]:
        return self.reports


class FakeHandle:
    """A ``DeploymentHandle`` of one model: ``script`` is the next response (or the error ``remote`` raises)."""

    def __init__(self) -> None:
        self.script: dict[str, Any] | BaseException = {"deltas": [Delta("hi"), Delta("", "stop", Usage(1, 1))]}
        self.reports: list[Any] = []
        self.requests: list[Any] = []
        self.response: FakeResponse | None = None
        self.generate = FakeMethod(self)

    def options(self, **_: Any) -> FakeHandle:
        return self

    def broadcast(self, method: str) -> FakeBroadcast:
        assert method == "info"
        return FakeBroadcast(self.reports)


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    path = tmp_path / "m-Q8_0.gguf"
    fake_gguf(str(path))
    return path


@pytest.fixture
def handle() -> FakeHandle:
    return FakeHandle()


@dataclass
class Services:
    """What the router holds: the core, and the API classes over it."""

    core: ServingCore
    chat: ChatServing
    completions: CompletionServing
    catalog: ModelCatalog


@pytest.fixture
def service(gguf: Path, handle: FakeHandle) -> Services:
    config = AppConfig.model_validate({"models": [{"name": "m", "kind": "gguf", "path": str(gguf)}]})
    core = ServingCore(config, {"m": handle})  # type: ignore[dict-item]
    return Services(core, ChatServing(core), CompletionServing(core), ModelCatalog(config, {"m": handle}))  # type: ignore[dict-item]


def body(**fields: Any) -> Any:
    return parse_request(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}, ChatCompletionRequest
    )


async def collect(service: Services, **fields: Any) -> list[dict[str, Any]]:
    prepared = await service.chat.prepare(body(**fields), "id-1")
    return [chunk async for chunk in service.chat.stream(prepared, "id-1")]


def test_prepare_resolves_sampling_deadlines_and_refuses_what_cannot_work(service: Services) -> None:
    prepared = asyncio.run(service.chat.prepare(body(temperature=0, max_tokens=7, chunk_timeout_s=2), "id"))
    assert (prepared.request.sampling.temperature, prepared.request.sampling.max_tokens) == (0, 7)
    assert prepared.deadlines.chunk_timeout_s == 2 and prepared.deadlines.first_chunk_timeout_s == 60
    with pytest.raises(ModelNotFound, match="available models: m"):
        asyncio.run(service.chat.prepare(body().model_copy(update={"model": "x"}), "id"))
    with pytest.raises(InvalidRequest, match="below the context size"):
        asyncio.run(service.chat.prepare(body(max_tokens=4096), "id"))
    with pytest.raises(InvalidRequest, match="exceeds the maximum"):
        asyncio.run(service.chat.prepare(body(request_timeout_s=10**6), "id"))


def test_background_work_has_every_choice_deprioritized_and_no_deadline(service: Services) -> None:
    prepared = asyncio.run(service.chat.prepare(body(n=2, chunk_timeout_s=2), "id")).background()
    assert [r.priority for r in prepared.requests] == [Priority.BACKGROUND] * 2
    assert prepared.deadlines == Deadlines()


def test_stream_and_complete_share_the_deltas(service: Services) -> None:
    chunks = asyncio.run(collect(service, stream_options={"include_usage": True}))
    assert [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]] == ["hi", None]
    assert chunks[-1]["usage"]["total_tokens"] == 2
    prepared = asyncio.run(service.chat.prepare(body(), "id-2"))
    completion = asyncio.run(service.chat.complete(prepared, "id-2"))
    assert completion["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": "hi"},
        "finish_reason": "stop",
    }


def test_a_deadline_cancels_the_replica_call(service: Services, handle: FakeHandle) -> None:
    handle.script = {"deltas": [Delta("a"), Delta("b")], "gap_s": 0.5}
    with pytest.raises(InferenceTimeout) as info:
        asyncio.run(collect(service, first_chunk_timeout_s=0.05))
    assert info.value.code == "first_chunk_timeout"
    assert handle.response is not None and handle.response.cancelled


def test_errors_are_classified_and_the_replica_call_cancelled(service: Services, handle: FakeHandle) -> None:
    from ray.serve.exceptions import BackPressureError

    handle.script = BackPressureError(num_queued_requests=1, max_queued_requests=1)
    with pytest.raises(Overloaded):
        asyncio.run(collect(service))
    handle.script = {"deltas": [Delta("a")], "fail": KeyError("internal detail")}
    with pytest.raises(InternalError) as info:
        asyncio.run(collect(service))
    assert "internal detail" not in info.value.message
    assert handle.response is not None and handle.response.cancelled


def test_an_abandoned_stream_cancels_the_replica_call(service: Services, handle: FakeHandle) -> None:
    async def take_one() -> None:
        prepared = await service.chat.prepare(body(), "id")
        stream = service.chat.stream(prepared, "id")
        await anext(stream)
        await stream.aclose()

    asyncio.run(take_one())
    assert handle.response is not None and handle.response.cancelled


def info(service: Services, status: ModelStatus, active: int = 0, error: str | None = None) -> ModelInfo:
    """One replica's report."""
    model = service.core.models["m"]
    facts = ModelFacts("m-Q8_0", 10, "Q8_0")
    return ModelInfo.describe(model, facts, status, replicas={status: 1}, active_generations=active, error=error)


def test_model_cards_merge_replicas_and_show_a_mixed_state(service: Services, handle: FakeHandle) -> None:
    handle.reports = [info(service, ModelStatus.LOADED, active=2), info(service, ModelStatus.LOADED, active=1)]
    (card,) = asyncio.run(service.catalog.list_models())
    assert (card["status"], card["replicas"], card["active_generations"]) == ("loaded", {"loaded": 2}, 3)
    handle.reports = [
        info(service, ModelStatus.LOADED),
        info(service, ModelStatus.FAILED, error="bad weights"),
        TimeoutError(),
    ]
    (card,) = asyncio.run(service.catalog.list_models())
    assert (card["status"], card["replicas"], card["error"]) == ("mixed", {"loaded": 1, "failed": 1}, "bad weights")


def test_n_choices_are_separate_engine_requests_with_seeds_of_their_own(service: Services, handle: FakeHandle) -> None:
    completion = asyncio.run(service.chat.complete(asyncio.run(service.chat.prepare(body(n=3, seed=7), "id")), "id"))
    assert [r.sampling.seed for r in handle.requests] == [7, 8, 9]
    assert len({r.request_id for r in handle.requests}) == 3
    assert [c["index"] for c in completion["choices"]] == [0, 1, 2]
    assert completion["usage"] == {  # the prompt once, every choice's tokens
        "prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4, "prompt_tokens_details": {"cached_tokens": 0}
    }  # fmt: skip
    chunks = asyncio.run(collect(service, n=2, stream_options={"include_usage": True}))
    opening = [c["choices"][0]["index"] for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]]
    assert sorted(opening) == [0, 1]
    assert chunks[-1]["usage"]["completion_tokens"] == 2
    with pytest.raises(InvalidRequest, match=r"router\.max_choices"):
        asyncio.run(service.chat.prepare(body(n=9), "id"))


def test_one_failed_choice_fails_the_request_and_cancels_the_others(service: Services, handle: FakeHandle) -> None:
    handle.script = {"deltas": [Delta("a")], "gap_s": 0.01, "fail": InvalidRequest("no")}
    with pytest.raises(InvalidRequest):
        asyncio.run(collect(service, n=2))
    assert handle.response is not None and handle.response.cancelled


def text(**fields: Any) -> Any:
    return parse_request({"model": "m", "prompt": "Once", **fields}, CompletionRequest)


def test_text_completions_choices_per_prompt_and_echo(service: Services, handle: FakeHandle) -> None:
    prepared = service.completions.prepare(text(prompt=["A", "B"], n=2, echo=True), "cmpl-1")
    assert [r.prompt for r in prepared.requests] == ["A", "A", "B", "B"]
    assert all(r.messages == () for r in prepared.requests)
    assert prepared.request.sampling.max_tokens == 16  # OpenAI's default for text completions
    completion = asyncio.run(service.completions.complete(prepared, "cmpl-1"))
    assert completion["object"] == "text_completion"
    assert [c["text"] for c in completion["choices"]] == ["Ahi", "Ahi", "Bhi", "Bhi"]
    assert completion["usage"]["prompt_tokens"] == 2  # two prompts, each once

    async def chunks() -> list[dict[str, Any]]:
        prepared = service.completions.prepare(text(echo=True, stream=True), "cmpl-2")
        return [chunk async for chunk in service.completions.stream(prepared, "cmpl-2")]

    streamed = asyncio.run(chunks())
    assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in streamed] == [
        ("Oncehi", None),
        ("", "stop"),
    ]
    with pytest.raises(InvalidRequest, match=r"router\.max_choices"):
        service.completions.prepare(text(prompt=["a"] * 5, n=2), "id")
