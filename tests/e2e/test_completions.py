"""Text completions and ``n`` choices through the real stack, on both engines."""

from __future__ import annotations

import json

import openai
import pytest

from tests.e2e.conftest import ServeApp, chat

pytestmark = pytest.mark.e2e

ENGINES = ["tiny", "vision"]  # llama.cpp, vLLM


@pytest.mark.parametrize("model", ENGINES)
def test_a_text_completion(client: openai.OpenAI, model: str) -> None:
    completion = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, seed=2)
    (choice,) = completion.choices
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert choice.text and choice.finish_reason in ("stop", "length")
    assert 0 < completion.usage.completion_tokens <= 8
    assert 3 <= completion.usage.prompt_tokens < 20  # the text as it is: no chat template around it


@pytest.mark.parametrize("model", ENGINES)
def test_several_prompts_times_n_give_a_choice_each(client: openai.OpenAI, model: str) -> None:
    completion = client.completions.create(
        model=model, prompt=["Red", "Green"], n=2, max_tokens=4, seed=1, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert completion.usage.completion_tokens == 16


@pytest.mark.parametrize("model", ENGINES)
def test_a_streamed_completion_with_echo_and_logprobs(app: ServeApp, model: str) -> None:
    body = {"model": model, "prompt": "Hello there", "max_tokens": 6, "stream": True, "echo": True, "ignore_eos": True}
    texts, tokens = [], 0
    with app.http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                (choice,) = json.loads(line[6:])["choices"]
                texts.append(choice["text"])
    assert texts[0].startswith("Hello there")
    whole = app.http.post("/v1/completions", json=body | {"stream": False, "echo": False, "logprobs": 2}).json()
    logprobs = whole["choices"][0]["logprobs"]
    tokens = whole["usage"]["completion_tokens"]
    assert tokens == 6 and len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == tokens
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"][0] == 0


@pytest.mark.parametrize("model", ENGINES)
def test_n_chat_choices(client: openai.OpenAI, model: str) -> None:
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], n=3, max_tokens=6, seed=5
    )
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in response.choices)


def test_llama_cpp_n_choices_share_the_prompts_cells(app: ServeApp, client: openai.OpenAI) -> None:
    """The engine's own counters: n-1 choices reuse the prompt's KV cells instead of prefilling it."""
    before = app.model_card("tiny")["engine_stats"]["prefix_cache_hits"]
    prompt = "A long shared prompt. " * 40
    response = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": prompt}], n=4, max_tokens=4, seed=5
    )
    hits = app.model_card("tiny")["engine_stats"]["prefix_cache_hits"] - before
    assert hits >= 3 * (response.usage.prompt_tokens - 1)


def test_text_completion_bad_input(app: ServeApp) -> None:
    for body, says in [
        ({"model": "tiny", "prompt": "x", "suffix": "y"}, "suffix: not supported by this server"),
        ({"model": "tiny", "prompt": "x", "echo": True, "logprobs": 1}, "echo with logprobs"),
        ({"model": "tiny", "prompt": "x", "logprobs": 6}, "logprobs"),
        ({"model": "tiny", "prompt": ["x"] * 3, "n": 3}, "router.max_choices"),
        ({"model": "tiny", "prompt": []}, "prompt"),
    ]:
        response = app.http.post("/v1/completions", json=body)
        assert response.status_code == 400, response.text
        assert says in response.json()["error"]["message"]
    response = app.http.post("/v1/chat/completions", json=chat("tiny", n=9))
    assert response.status_code == 400 and "n=9 exceeds" in response.json()["error"]["message"]
