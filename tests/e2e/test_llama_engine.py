"""The batched llama.cpp engine itself (no Serve): its scheduling does not change what a request computes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from deployments.config import GGUFModelConfig
from deployments.engines.base import Delta, GenerationRequest, SamplingParams
from deployments.engines.gguf import LlamaCppEngine

pytestmark = pytest.mark.e2e


def request(i: int) -> GenerationRequest:
    sampling = SamplingParams(temperature=0, top_p=1, top_k=0, max_tokens=24, ignore_eos=True)
    messages = ({"role": "user", "content": f"{i} " + "abc " * i},)
    return GenerationRequest(request_id=f"r{i}", messages=messages, sampling=sampling)


async def solo_outputs(path: Path, parallel: int) -> list[str]:
    """Each request alone in a fresh engine (no prefix cache), greedy."""
    outputs = []
    for i in range(6):
        engine = LlamaCppEngine(GGUFModelConfig(name="m", path=path, parallel=parallel, n_threads=1))
        await engine.load()
        outputs.append("".join([delta.text async for delta in engine.generate(request(i))]))
        await engine.unload()
    return outputs


def test_a_request_alone_in_the_batched_engine_computes_what_it_computes_serially(models_dir: Path) -> None:
    path = models_dir / "tiny-llama-Q4_K_M.gguf"
    assert asyncio.run(solo_outputs(path, 8)) == asyncio.run(solo_outputs(path, 1))


def test_the_engine_hands_a_fast_stream_over_once_per_interval_and_loses_nothing(models_dir: Path) -> None:
    """The first token at once, the rest joined: one wake-up of the event loop per chunk."""
    sampling = SamplingParams(temperature=0, top_p=1, top_k=0, max_tokens=64, ignore_eos=True, logprobs=0)
    coalesced = GenerationRequest(
        request_id="c", messages=({"role": "user", "content": "go"},), sampling=sampling, stream_interval_s=600
    )

    async def run() -> list[Delta]:
        engine = LlamaCppEngine(GGUFModelConfig(name="m", path=models_dir / "tiny-llama-Q4_K_M.gguf", n_threads=1))
        await engine.load()
        try:
            return [delta async for delta in engine.generate(coalesced)]
        finally:
            await engine.unload()

    first, last = asyncio.run(run())  # exactly two: the interval outlasts the generation
    assert len(first.logprobs) == 1 and last.finish_reason == "length"
    tokens = first.logprobs + last.logprobs
    assert len(tokens) == 64
    assert b"".join(t.token for t in tokens).decode(errors="replace") == first.text + last.text


def test_an_idle_engine_saves_finished_prompts_to_host_memory_and_keeps_them_in_their_slots(models_dir: Path) -> None:
    """Copied while nothing runs, not when the next requests are admitted and wait on the copy."""

    async def run() -> tuple[int, int]:
        config = GGUFModelConfig(name="m", path=models_dir / "tiny-llama-Q4_K_M.gguf", parallel=2, n_threads=1)
        engine = LlamaCppEngine(config)
        await engine.load()
        try:
            first = [delta async for delta in engine.generate(request(3))]
            deadline = asyncio.get_running_loop().time() + 30
            while engine.stats()["prompt_cache_entries"] < 1:  # no other request came
                assert asyncio.get_running_loop().time() < deadline, engine.stats()
                await asyncio.sleep(0.01)
            again = [delta async for delta in engine.generate(request(3))]
            usage = again[-1].usage
            assert usage is not None and "".join(d.text for d in again) == "".join(d.text for d in first)
            return usage.cached_tokens, usage.prompt_tokens
        finally:
            await engine.unload()

    cached, prompt = asyncio.run(run())
    assert cached == prompt - 1  # from its slot or from host memory: the whole prompt but the last token
