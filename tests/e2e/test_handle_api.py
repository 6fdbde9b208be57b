"""The Python API for in-cluster callers: nika's infer / infer_stream over deployment handles."""

from __future__ import annotations

import pytest
from ray import serve

from deployments.errors import InvalidRequest, ModelNotFound
from tests.e2e.conftest import APP_NAME, ServeApp, chat

pytestmark = pytest.mark.e2e


@pytest.fixture
def router(app: ServeApp) -> serve.handle.DeploymentHandle:
    return serve.get_app_handle(APP_NAME)


def test_infer_returns_a_chat_completion(router: serve.handle.DeploymentHandle) -> None:
    completion = router.infer.remote(chat(max_tokens=8, temperature=0)).result()
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"]
    assert completion["usage"]["completion_tokens"] <= 8


def test_infer_stream_yields_the_same_text(router: serve.handle.DeploymentHandle) -> None:
    request = chat(max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(router.options(stream=True).infer_stream.remote(request))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    whole = router.infer.remote(chat(max_tokens=12, temperature=0)).result()
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == whole["usage"]


def test_errors_arrive_as_taxonomy_classes(router: serve.handle.DeploymentHandle) -> None:
    with pytest.raises(ModelNotFound) as info:
        router.infer.remote(chat("nope")).result()
    assert info.value.code == "model_not_found" and info.value.status_code == 404
    with pytest.raises(InvalidRequest, match="temperature"):
        next(iter(router.options(stream=True).infer_stream.remote(chat(temperature=5))))
