"""Sampling options and logprobs through the real stack, on both engines."""

from __future__ import annotations

import json
import re
from typing import Any

import openai
import pytest

from tests.e2e.conftest import ServeApp, chat

pytestmark = pytest.mark.e2e

ENGINES = ["tiny", "vision"]  # llama.cpp, vLLM
SPECIAL = re.compile(r"<[^<>\s]+>")  # e.g. vLLM's <s>, <row_1_col_2>: in logprobs, not in the text


def spelt(tokens: list[Any]) -> str:
    """The text the tokens spell, without special tokens (which the answer's text leaves out)."""
    pieces = [bytes(t["bytes"] if isinstance(t, dict) else t.bytes) for t in tokens]
    return b"".join(p for p in pieces if not SPECIAL.fullmatch(p.decode(errors="replace"))).decode(errors="replace")


@pytest.mark.parametrize("model", ENGINES)
def test_logit_bias_forces_a_token(app: ServeApp, model: str) -> None:
    """Greedy, with +100 on one token: every generated token is that one."""
    body = chat(model, "hello", max_tokens=8, temperature=0, logit_bias={"300": 100}, ignore_eos=True)
    response = app.http.post("/v1/chat/completions", json=body).json()
    text = response["choices"][0]["message"]["content"]
    assert response["usage"]["completion_tokens"] == 8
    assert text and text == text[: len(text) // 8] * 8


@pytest.mark.parametrize("model", ENGINES)
def test_penalties_change_a_greedy_answer(app: ServeApp, model: str) -> None:
    """A greedy random model repeats itself; penalties on what it already said change that."""
    plain = chat(model, "tell me", max_tokens=48, temperature=0, ignore_eos=True)
    texts = [
        app.http.post("/v1/chat/completions", json=plain | extra).json()["choices"][0]["message"]["content"]
        for extra in ({}, {"frequency_penalty": 2.0, "presence_penalty": 2.0}, {"repetition_penalty": 3.0})
    ]
    assert texts[0] != texts[1] and texts[0] != texts[2]
    # min_p is accepted and honoured as a filter (greedy keeps the top token: same answer).
    same = app.http.post("/v1/chat/completions", json=plain | {"min_p": 0.5}).json()
    assert same["choices"][0]["message"]["content"] == texts[0]


@pytest.mark.parametrize("model", ENGINES)
def test_logprobs_with_alternatives(client: openai.OpenAI, model: str) -> None:
    """Greedy: each chosen token is its own likeliest alternative, and the tokens spell the answer."""
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=12, temperature=0,
        logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True},
    )  # fmt: skip
    choice = response.choices[0]
    content = choice.logprobs.content
    assert len(content) == response.usage.completion_tokens == 12
    assert spelt(content) == choice.message.content
    for token in content:
        assert len(token.top_logprobs) == 3
        assert token.logprob <= 0
        assert [t.logprob for t in token.top_logprobs] == sorted((t.logprob for t in token.top_logprobs), reverse=True)
        assert token.top_logprobs[0].token == token.token
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob, abs=1e-3)


@pytest.mark.parametrize("model", ENGINES)
def test_streamed_logprobs_cover_every_token(app: ServeApp, model: str) -> None:
    body = chat(model, "hi", max_tokens=10, logprobs=True, stream=True, ignore_eos=True, seed=5)
    tokens: list[dict[str, Any]] = []
    text = []
    with app.http.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text.append(choice["delta"].get("content") or "")
                    tokens += (choice.get("logprobs") or {}).get("content") or []
    assert len(tokens) == 10
    assert all(t["top_logprobs"] == [] and t["logprob"] <= 0 for t in tokens)
    assert spelt(tokens) == "".join(text)
