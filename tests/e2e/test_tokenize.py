"""``POST /tokenize`` and ``/detokenize`` on both engines: the counts are what a generation reports."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import ServeApp, chat

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]


@pytest.mark.parametrize("model", ["tiny", "vision"])
def test_a_chat_prompt_counts_the_prompt_tokens_its_completion_reports(app: ServeApp, model: str) -> None:
    counted = app.http.post("/tokenize", json={"model": model, "messages": MESSAGES})
    assert counted.status_code == 200, counted.text
    completion = app.http.post("/v1/chat/completions", json=chat(model, messages=MESSAGES, max_tokens=1)).json()
    assert counted.json()["count"] == len(counted.json()["tokens"]) == completion["usage"]["prompt_tokens"]
    assert counted.json()["max_model_len"] == app.model_card(model)["context_length"]


@pytest.mark.parametrize("model", ["tiny", "vision"])
def test_text_goes_through_tokenize_and_detokenize_and_back(app: ServeApp, model: str) -> None:
    text = "The quick brown fox jumps over 13 lazy dogs."
    tokens = app.http.post("/tokenize", json={"model": model, "prompt": text, "add_special_tokens": False}).json()
    assert tokens["count"] > 3
    back = app.http.post("/detokenize", json={"model": model, "tokens": tokens["tokens"]}).json()
    assert back["prompt"].strip() == back["content"].strip() == text
    completion = app.http.post("/v1/completions", json={"model": model, "prompt": text, "max_tokens": 1}).json()
    with_special = app.http.post("/tokenize", json={"model": model, "prompt": text}).json()
    assert with_special["count"] == completion["usage"]["prompt_tokens"]


def test_what_cannot_be_tokenized_is_a_400_that_says_why(app: ServeApp) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    answers = [
        app.http.post("/tokenize", json={"model": "vision", "messages": [{"role": "user", "content": [image]}]}),
        app.http.post("/detokenize", json={"model": "tiny", "tokens": [10**9]}),
        app.http.post("/tokenize", json={"prompt": "no model named"}),
    ]
    assert [a.status_code for a in answers] == [400, 400, 400]
    messages = [a.json()["error"]["message"] for a in answers]
    assert "cannot count the tokens of images" in messages[0]
    assert "not in the vocabulary" in messages[1]
    assert "model: required" in messages[2]
