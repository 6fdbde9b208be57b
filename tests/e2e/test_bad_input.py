"""A corpus of bad requests: each gets a 4xx saying what to fix, and the server is unharmed."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from tests.e2e.conftest import ServeApp, chat

pytestmark = pytest.mark.e2e

IMAGE = {
    "type": "image_url",
    "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"\x89PNG junk").decode()},
}


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def msg(content: Any, role: str = "user") -> list[dict[str, Any]]:
    return [{"role": role, "content": content}]


# name -> (raw body, headers, status, a fragment of the message)
CORPUS: dict[str, tuple[bytes, dict[str, str], int, str]] = {
    "broken json": (b'{"model": "tiny", "messages": [', {}, 400, "not valid JSON"),
    "not json": (b"hello there", {}, 400, "not valid JSON"),
    "empty body": (b"", {}, 400, "not valid JSON"),
    "json array": (b"[]", {}, 400, "Input should be an object"),
    "json null": (b"null", {}, 400, "Input should be an object"),
    "non-utf8 bytes": (b'{"model": "\xff\xfe", "messages": []}', {}, 400, "not valid JSON"),
    "missing model": (body(messages=msg("hi")), {}, 400, "model: Field required"),
    "missing messages": (body(model="tiny"), {}, 400, "messages: Field required"),
    "model not a string": (body(model=123, messages=msg("hi")), {}, 400, "model:"),
    "messages not a list": (body(model="tiny", messages="hi"), {}, 400, "messages:"),
    "empty messages": (body(model="tiny", messages=[]), {}, 400, "messages:"),
    "message without role": (body(model="tiny", messages=[{"content": "hi"}]), {}, 400, "messages.0.role"),
    "unknown role": (body(model="tiny", messages=msg("hi", role="robot")), {}, 400, "messages.0.role"),
    "content wrong type": (body(model="tiny", messages=msg(123)), {}, 400, "messages.0.content"),
    "unknown content part": (body(model="tiny", messages=msg([{"type": "audio"}])), {}, 400, "messages.0.content"),
    "text part without text": (body(model="tiny", messages=msg([{"type": "text"}])), {}, 400, "text"),
    "negative max_tokens": (body(**chat(max_tokens=-5)), {}, 400, "max_tokens"),
    "zero max_tokens": (body(**chat(max_tokens=0)), {}, 400, "max_tokens"),
    "huge max_tokens": (body(**chat(max_tokens=10**9)), {}, 400, "below the context size"),
    "max_tokens not a number": (body(**chat(max_tokens="ten")), {}, 400, "max_tokens"),
    "temperature too high": (body(**chat(temperature=5)), {}, 400, "temperature"),
    "negative temperature": (body(**chat(temperature=-1)), {}, 400, "temperature"),
    "top_p zero": (body(**chat(top_p=0)), {}, 400, "top_p"),
    "top_p above one": (body(**chat(top_p=1.5)), {}, 400, "top_p"),
    "negative top_k": (body(**chat(top_k=-1)), {}, 400, "top_k"),
    "too many stop sequences": (body(**chat(stop=["a", "b", "c", "d", "e"])), {}, 400, "stop"),
    "empty stop sequence": (body(**chat(stop=[""])), {}, 400, "stop"),
    "n above the limit": (body(**chat(n=9)), {}, 400, "n=9 exceeds the limit of 8 choices"),
    "unknown field": (body(**chat(temprature=0.5)), {}, 400, "temprature: unknown field"),
    "stream not a boolean": (body(**chat(stream=[1])), {}, 400, "stream"),
    "seed not a number": (body(**chat(seed="abc")), {}, 400, "seed"),
    "stream_options wrong": (body(**chat(stream_options={"include_usage": "maybe"})), {}, 400, "stream_options"),
    "deadline above maximum": (body(**chat(chunk_timeout_s=10**6)), {}, 400, "exceeds the maximum"),
    "negative deadline": (body(**chat(request_timeout_s=-1)), {}, 400, "request_timeout_s"),
    "unknown model": (body(**chat("gpt-9")), {}, 404, "not found; available models"),
    "image to a text model": (body(model="tiny", messages=msg([IMAGE])), {}, 400, "does not accept images"),
    "undecodable image": (body(model="vision", messages=msg([IMAGE])), {}, 400, "image 1:"),
    "remote image": (
        body(model="vision", messages=msg([{"type": "image_url", "image_url": {"url": "http://10.0.0.1/x.png"}}])),
        {},
        400,
        "remote image URLs are refused",
    ),
    "too many messages": (body(model="tiny", messages=msg("hi") * 300), {}, 400, "too many messages"),
    "prompt beyond the context": (body(**chat(content="word " * 3000)), {}, 400, "exceeds the context"),
    "wrong content type": (
        body(**chat()),
        {"content-type": "text/plain"},
        415,
        "Content-Type must be application/json",
    ),
    "form content type": (b"model=tiny", {"content-type": "application/x-www-form-urlencoded"}, 415, "Content-Type"),
    "body too large": (b"{" + b" " * (65 * 2**20) + b"}", {}, 413, "exceeds the limit"),
}


def test_the_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("case", list(CORPUS))
def test_bad_input_is_a_4xx_saying_what_to_fix(app: ServeApp, case: str) -> None:
    raw, headers, status, fragment = CORPUS[case]
    response = app.http.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"} | headers
    )
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert fragment in error["message"], error
    assert error["type"] and error["code"]


def test_after_the_corpus_the_server_serves_at_once(app: ServeApp) -> None:
    for raw, headers, _, _ in CORPUS.values():
        app.http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"} | headers)
    response = app.http.post("/v1/chat/completions", json=chat(max_tokens=4), timeout=10)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] >= 1
