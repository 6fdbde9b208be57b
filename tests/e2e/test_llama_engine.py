"""The batched llama.cpp engine itself (no Serve): its scheduling does not change what a request computes."""

from __future__ import annotations

import asyncio
import ctypes
from pathlib import Path
from typing import Any

import pytest

from deployments.config import GGUFModelConfig
from deployments.engines.base import Delta, GenerationRequest, SamplingParams
from deployments.engines.gguf import LlamaCppEngine

pytestmark = pytest.mark.e2e


def request(i: int) -> GenerationRequest:
    sampling = SamplingParams(temperature=0, top_p=1, top_k=0, max_tokens=24, ignore_eos=True)
    messages = ({"role": "user", "content": f"{i} " + "abc " * i},)
    return GenerationRequest(request_id=f"r{i}", messages=messages, sampling=sampling)


async def solo_outputs(path: Path, parallel: int, **config: Any) -> list[str]:
    """Each request alone in a fresh engine (no prefix cache), greedy."""
    outputs = []
    for i in range(6):
        engine = LlamaCppEngine(GGUFModelConfig(name="m", path=path, parallel=parallel, n_threads=1, **config))
        await engine.load()
        outputs.append("".join([delta.text async for delta in engine.generate(request(i))]))
        await engine.unload()
    return outputs


@pytest.mark.parametrize("kv_unified", [False, True], ids=["a stream per sequence", "one pool"])
def test_a_request_alone_in_the_batched_engine_computes_what_it_computes_serially(
    models_dir: Path, kv_unified: bool
) -> None:
    path = models_dir / "tiny-llama-Q4_K_M.gguf"
    assert asyncio.run(solo_outputs(path, 8, kv_unified=kv_unified)) == asyncio.run(solo_outputs(path, 1))


class Engine:
    """A loaded engine for one test, and what it generates for requests run together."""

    def __init__(self, path: Path, **config: Any) -> None:
        self.engine = LlamaCppEngine(GGUFModelConfig(name="m", path=path, n_threads=1, **config))

    async def __aenter__(self) -> Engine:
        await self.engine.load()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.engine.unload()

    async def run(self, *requests: GenerationRequest) -> list[list[Delta]]:
        async def one(r: GenerationRequest) -> list[Delta]:
            return [delta async for delta in self.engine.generate(r)]

        return await asyncio.gather(*(one(r) for r in requests))

    def stats(self) -> dict[str, float]:
        return self.engine.stats()


def text(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


def test_running_sequences_keep_consecutive_ids_and_decode_in_one_pass(models_dir: Path) -> None:
    """With a stream per sequence llama.cpp decodes one run of consecutive ids per pass: a new
    request takes the lowest free slot, so only a step with a prompt chunk takes a second pass."""

    async def run() -> dict[str, float]:
        async with Engine(models_dir / "tiny-llama-Q4_K_M.gguf", parallel=8) as e:
            queue = [request(i) for i in range(16)]

            async def client() -> None:
                while queue:
                    await e.run(queue.pop())

            await asyncio.gather(*(client() for _ in range(3)))
            return e.stats()

    stats = asyncio.run(run())
    assert stats["admitted"] == 16 and stats["peak_batch_size"] == 3
    assert stats["steps"] < stats["passes"] <= stats["steps"] + stats["admitted"], stats


def test_a_prefix_another_slot_holds_is_copied_on_the_device_not_computed_again(models_dir: Path) -> None:
    """The lowest free slot holds another prompt; the one this request repeats is in the next
    slot: that stream is copied (llama.cpp copies whole streams, at the next decode), and the
    prompt's cells in both slots hold the same bytes. (A random model's log-probs hardly depend on
    the prompt, so the cells themselves are compared, as llama.cpp serializes them.)"""
    import llama_cpp

    sampling = request(0).sampling
    red, blue = (
        GenerationRequest(request_id=w, messages=({"role": "user", "content": f"{w} " * 40},), sampling=sampling)
        for w in ("red", "blue")
    )

    def state(ctx: Any, seq_id: int) -> bytes:
        size = llama_cpp.llama_state_seq_get_size(ctx, seq_id)
        buffer = (ctypes.c_uint8 * size)()
        assert llama_cpp.llama_state_seq_get_data(ctx, buffer, size, seq_id) == size
        return bytes(buffer)

    async def run() -> tuple[list[Delta], dict[str, float], bytes, bytes]:
        # no prompt cache: no copy to host memory while idle, so the scheduler thread leaves the context alone
        async with Engine(models_dir / "tiny-llama-Q4_K_M.gguf", parallel=2, prompt_cache_mib=0) as e:
            await e.run(red, blue)  # slots 0 and 1
            (again,) = await e.run(blue)  # into slot 0, from slot 1
            usage = again[-1].usage
            assert usage is not None
            # Idle now. The copied cells: the prompt but its last token, which slot 0 decoded again.
            ctx = e.engine._context.ctx
            for seq_id in (0, 1):
                llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), seq_id, usage.cached_tokens, -1)
            return again, e.stats(), state(ctx, 0), state(ctx, 1)

    again, stats, copied, original = asyncio.run(run())
    usage = again[-1].usage
    assert usage is not None and usage.cached_tokens == usage.prompt_tokens - 1
    assert stats["kv_stream_copies"] == 1 and stats["kv_restores"] == 0
    # Each state is [n_stream][per stream: its cell count, then each cell's position and seq id,
    # then the K and V rows]; the other stream's count is 0. The rows, nearly all of it, are the
    # same bytes where the copy happened.
    assert len(copied) == len(original) > 1000 * usage.cached_tokens
    rows = int(0.9 * len(copied))
    assert copied[-4 - rows : -4] == original[-rows:]


def test_once_idle_prompts_are_saved_admitting_a_burst_copies_nothing(models_dir: Path) -> None:
    """Finished prompts go to host memory while nothing runs; the next burst only takes their cells."""

    async def run() -> tuple[dict[str, float], dict[str, float]]:
        async with Engine(models_dir / "tiny-llama-Q4_K_M.gguf", parallel=2) as e:
            await e.run(request(1), request(2))
            deadline = asyncio.get_running_loop().time() + 30
            while e.stats()["prompt_cache_entries"] < 2:
                assert asyncio.get_running_loop().time() < deadline, e.stats()
                await asyncio.sleep(0.01)
            before = e.stats()
            await e.run(request(3), request(4))
            return before, e.stats()

    before, after = asyncio.run(run())
    assert before["kv_saves"] == 2 and before["admission_kv_copies"] == 0
    assert after["admitted"] - before["admitted"] == 2
    assert after["admission_kv_copies"] == 0 and after["admit_seconds"] > before["admit_seconds"]


def test_sampling_in_the_decode_graph_picks_the_host_chain_s_tokens(models_dir: Path) -> None:
    """llama.cpp's backend samplers, here on the CPU backend: greedy with a bias and penalties
    gives the host chain's tokens; logprobs fall back to the host per sequence; a seeded draw
    in the graph repeats itself, also with the chain a like request left attached."""
    greedy = SamplingParams(temperature=0, top_p=1, top_k=0, max_tokens=24, ignore_eos=True, logit_bias=((7, 2.0),))
    penalized = greedy.model_copy(update={"repetition_penalty": 1.3, "frequency_penalty": 0.5})
    with_logprobs = greedy.model_copy(update={"logprobs": 2})
    drawn = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, max_tokens=24, ignore_eos=True, seed=7)
    requests = [
        GenerationRequest(request_id=f"s{i}", messages=({"role": "user", "content": f"{i} go"},), sampling=s)
        for i, s in enumerate([greedy, penalized, with_logprobs])
    ]
    seeded = GenerationRequest(request_id="d", messages=({"role": "user", "content": "draw"},), sampling=drawn)

    async def run(backend_sampling: bool) -> tuple[list[str], list[str], dict[str, float]]:
        async with Engine(models_dir / "tiny-llama-Q4_K_M.gguf", parallel=4, backend_sampling=backend_sampling) as e:
            outputs = [text((await e.run(r))[0]) for r in requests]  # one at a time: the same passes on both
            draws = [text(d) for d in await e.run(seeded)] + [text(d) for d in await e.run(seeded)]
            return outputs, draws, e.stats()

    on_host, _, host_stats = asyncio.run(run(False))
    in_graph, draws, stats = asyncio.run(run(True))
    assert in_graph == on_host
    assert draws[0] == draws[1] and draws[0]
    assert host_stats["backend_sampled"] == 0
    # every token but the logprobs request's (24, and the warm-up none): 2 greedy + 2 seeded draws
    assert stats["backend_sampled"] == 4 * 24 and stats["host_sampled"] == 24
    # In slot 0 each: the greedy chain attached, the penalized one instead, detached for the
    # logprobs, the seeded one attached; the second seeded request samples with that chain,
    # reset to its seed: a graph reserve saved.
    assert stats["sampler_changes"] == 4


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
