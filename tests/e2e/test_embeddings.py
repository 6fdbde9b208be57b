"""Embeddings through the real stack: llama.cpp pooling on the generated embedding model."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest

from tests.e2e.conftest import ServeApp, chat

pytestmark = pytest.mark.e2e


def test_several_inputs_one_normalized_vector_each(client: openai.OpenAI) -> None:
    texts = ["hello world", "hello world", "a different sentence"]
    response = client.embeddings.create(model="embed", input=texts)
    vectors = np.array([item.embedding for item in sorted(response.data, key=lambda d: d.index)])
    assert vectors.shape == (3, 256)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert vectors[0] @ vectors[1] > 0.999  # the same text, the same vector (batched together)
    assert vectors[0] @ vectors[2] < 0.99
    assert response.usage.prompt_tokens == response.usage.total_tokens > 6


def test_base64_and_token_inputs(app: ServeApp, client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model="embed", input="hello world").data[0].embedding
    body = {"model": "embed", "input": "hello world", "encoding_format": "base64"}
    encoded = app.http.post("/v1/embeddings", json=body).json()["data"][0]["embedding"]
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(encoded), dtype="<f4"), floats, rtol=1e-6)
    tokens = app.http.post("/v1/embeddings", json={"model": "embed", "input": [[1, 40, 41], [1, 42]]}).json()
    assert [d["index"] for d in tokens["data"]] == [0, 1] and tokens["usage"]["prompt_tokens"] == 5


def test_langchain_openai_embeddings(app: ServeApp) -> None:
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length=False: send texts, not tiktoken's tokens of some OpenAI model.
    embeddings = OpenAIEmbeddings(
        model="embed", base_url=f"{app.base_url}/v1", api_key="unused", check_embedding_ctx_length=False
    )
    vectors = embeddings.embed_documents(["one", "two"])
    assert len(vectors) == 2 and len(vectors[0]) == 256
    assert len(embeddings.embed_query("three")) == 256


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/v1/embeddings", {"model": "tiny", "input": "x"}, 400,
         "does not serve POST /v1/embeddings; models that do: embed"),
        ("/v1/chat/completions", chat("embed"), 400, "does not serve chat and text completions"),
        ("/v1/embeddings", {"model": "embed", "input": "x " * 400}, 400, "embeds 1 to 256 tokens per input"),
        ("/v1/embeddings", {"model": "embed", "input": [[99999]]}, 400, "token ids must be in the vocabulary"),
        ("/v1/embeddings", {"model": "embed", "input": []}, 400, "input"),
        ("/v1/embeddings", {"model": "embed", "input": "x", "dimensions": 8}, 400, "dimensions: not supported"),
        ("/v1/embeddings", {"model": "nope", "input": "x"}, 404, "available models"),
    ],
)  # fmt: skip
def test_bad_embedding_requests(app: ServeApp, path: str, body: dict, status: int, says: str) -> None:
    response = app.http.post(path, json=body)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]["message"]


def test_the_card_says_embeddings(app: ServeApp) -> None:
    assert app.model_card("embed")["embeddings"] is True
    assert app.model_card("tiny")["embeddings"] is False
