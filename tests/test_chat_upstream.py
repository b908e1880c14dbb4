"""/chat through the real OpenAI and Anthropic SDKs to the local fake provider."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient

from app import create_app
from fakeprovider import FakeProvider
from limiting.providers import clients
from tests.conftest import provider_env, write_policy
from tests.policies import loaded_toml

POLICY = loaded_toml() + """
[plans.p]
burst = 50
refill_per_second = 1
quotas = ["100 per day"]
tokens_per_minute = 100000
[models."gpt-4o-mini"]
provider = "openai"
requests_per_minute = 1000
[models."claude-3-5-haiku-latest"]
provider = "anthropic"
"""


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProvider]:
    yield from provider_env(monkeypatch, upstream_timeout="2")  # type: ignore[misc]


@pytest.fixture
def client(tmp_path: Path, r: redis.Redis, redis_url: str, fake: FakeProvider) -> FlaskClient:
    # Anonymous /chat in front of a paid provider, said explicitly (the default needs a key).
    app = create_app({"REDIS_URL": redis_url, "LIMITS_CONFIG": write_policy(tmp_path, POLICY),
                      "REQUIRE_API_KEY": "0"})
    return app.test_client()


def chat(client: FlaskClient, model: str, message: str = "hello there"):
    return client.post("/chat", json={"message": message, "user_id": "u", "model": model})


@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-3-5-haiku-latest"])
def test_chat_calls_the_provider_and_settles_usage(client: FlaskClient, fake: FakeProvider,
                                                   r: redis.Redis, model: str) -> None:
    resp = chat(client, model)
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json() == {"reply": "echo: hello there"}
    assert fake.requests[-1].body["max_tokens"] == 1024
    # Settled to the fake's count (2 words + 4 in, 3 out), not the 1,000+ reserved.
    engine = client.application.extensions["llm_limiter"].engine
    left = {s.layer.name: s.remaining for s in engine.peek("u", realm="b").states}
    assert left["tokens-minute"] == 100000 - 9


@pytest.mark.parametrize(("status", "code", "http"), [
    (429, "upstream_rate_limited", 503), (529, "upstream_overloaded", 503),
    (500, "upstream_error", 502), (401, "upstream_auth_failed", 502),
])
def test_upstream_errors_are_clear_json(client: FlaskClient, fake: FakeProvider, status: int,
                                        code: str, http: int) -> None:
    fake.fail_next(status, retry_after=3 if status in (429, 529) else None)
    resp = chat(client, "gpt-4o-mini")
    assert resp.status_code == http
    body = resp.get_json()
    assert body["code"] == code and "sk-fake" not in resp.get_data(as_text=True)
    if http == 503:
        assert resp.headers["Retry-After"] == "3"


def test_upstream_timeout_is_504(client: FlaskClient, fake: FakeProvider) -> None:
    fake.set_delay(3)
    resp = chat(client, "gpt-4o-mini")
    assert resp.status_code == 504 and resp.get_json()["code"] == "upstream_timeout"


def test_upstream_unreachable_is_502(client: FlaskClient, fake: FakeProvider,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    clients.reset()
    resp = chat(client, "gpt-4o-mini")
    assert resp.status_code == 502 and resp.get_json()["code"] == "upstream_unreachable"


def test_provider_429_teaches_the_guard(client: FlaskClient, fake: FakeProvider) -> None:
    fake.fail_next(429, retry_after=30)
    assert chat(client, "gpt-4o-mini").status_code == 503
    before = len(fake.requests)
    resp = chat(client, "gpt-4o-mini")
    # The guard now holds every worker back: the provider is not called again.
    assert resp.status_code == 503 and resp.get_json()["code"] == "upstream_saturated"
    assert 25 <= int(resp.headers["Retry-After"]) <= 30
    assert len(fake.requests) == before
