"""On one machine the router also serves on its own port (Serve's direct ingress): the same API,
errors and streams as through Serve's proxy. Cancellation and the API key are checked on both
ports in their own modules (``ingress_url``, ``test_security``)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest

from tests.conftest import DIRECT_INGRESS_PORT, ROOT
from tests.e2e.conftest import APP_NAME, ServeApp

pytestmark = pytest.mark.e2e


def stream(client: openai.OpenAI) -> tuple[str, list[str | None], Any]:
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Name three rivers."}],
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finish, chunks[-1].usage.completion_tokens


def test_the_router_serves_the_same_api_on_its_own_port(app: ServeApp) -> None:
    assert urlsplit(app.direct_url).port >= DIRECT_INGRESS_PORT
    direct = openai.OpenAI(base_url=f"{app.direct_url}/v1", api_key="unused", max_retries=0, timeout=60)
    proxied = stream(app.openai)
    assert proxied[0] and len(proxied[1]) == 1 and proxied[2] > 0
    assert stream(direct) == proxied  # greedy: the same text, finish_reason and usage
    with pytest.raises(openai.NotFoundError) as via_direct:
        direct.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError) as via_proxy:
        app.openai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert via_direct.value.body == via_proxy.value.body


def test_the_cli_prints_the_router_url(app: ServeApp) -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "deployments.direct_ingress", APP_NAME, "--first-port", str(DIRECT_INGRESS_PORT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert printed.stdout.split() == [app.direct_url]
    missing = subprocess.run(
        [sys.executable, "-m", "deployments.direct_ingress", "no-such-app", "--first-port", str(DIRECT_INGRESS_PORT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert (
        missing.returncode != 0
        and f"no router of app 'no-such-app' serves on its own port (ports {DIRECT_INGRESS_PORT}+)" in missing.stderr
    )
