"""The optional API key."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from deployments.config import AppConfig
from tests.e2e.conftest import ServeApp, chat, e2e_config, router_url

pytestmark = pytest.mark.e2e


def test_an_api_key_guards_every_route_but_healthz(app: ServeApp) -> None:
    base = e2e_config(app.models_dir, vision=False).model_dump(mode="json")
    base["router"] |= {
        "api_key_env": "NIKA_API_KEY",
        "deployment": {"ray_actor_options": {"num_cpus": 0.5, "runtime_env": {"env_vars": {"NIKA_API_KEY": "sekret"}}}},
    }
    with app.side_app("secured", AppConfig.model_validate(base)) as proxied:
        for base_url in (proxied, router_url("secured")):  # the router's own port checks the key the same way
            assert httpx.get(f"{base_url}/healthz").status_code == 200
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic sekret"}):
                response = httpx.get(f"{base_url}/v1/models", headers=headers)
                assert response.status_code == 401
                assert response.json()["error"]["type"] == "authentication_error"
                assert httpx.post(f"{base_url}/v1/chat/completions", json=chat(), headers=headers).status_code == 401
            client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sekret", max_retries=0)
            assert client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=f"{base_url}/v1", api_key="nope", max_retries=0).models.list()
            # Anthropic's clients send the key as x-api-key, and read errors in Anthropic's shape.
            claude = anthropic.Anthropic(base_url=base_url, api_key="sekret", max_retries=0)
            hello = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
            assert claude.messages.create(**hello).content
            with pytest.raises(anthropic.AuthenticationError) as refused:
                anthropic.Anthropic(base_url=base_url, api_key="nope", max_retries=0).messages.create(**hello)
            assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
