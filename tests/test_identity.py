"""Who pays: a /chat body's user_id and an API key's user never share limits, and paid calls
are never anonymous unless the operator says so."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import redis
from flask import Flask

from app import create_app
from tests.conftest import write_policy
from tests.policies import plan, policy

POLICY = policy(per_ip="1000 per minute", plans={"starter": plan(3, 0.01, "100 per day")})


def app_with(tmp_path: Path, redis_url: str, **config: object) -> Flask:
    return create_app({"REDIS_URL": redis_url, "LIMITS_CONFIG": write_policy(tmp_path, POLICY),
                       "TESTING": True, **config})


@pytest.fixture(autouse=True)
def no_provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "REQUIRE_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def test_anonymous_body_ids_cannot_spend_a_key_holders_limits(tmp_path: Path, r: redis.Redis,
                                                              redis_url: str) -> None:
    app = app_with(tmp_path, redis_url)
    client = app.test_client()
    key, _ = app.extensions["llm_limiter"].keys.create("alice")
    codes = [client.post("/chat", json={"message": "hi", "user_id": "alice"}).status_code
             for _ in range(10)]
    assert codes == [200] * 3 + [429] * 7            # the body id "alice" has its own bucket
    auth = {"Authorization": f"Bearer {key}"}
    for _ in range(3):                                # alice's key still has all of hers
        resp = client.post("/v1/chat/completions", headers=auth,
                           json={"model": "echo", "messages": [{"role": "user", "content": "x"}]})
        assert resp.status_code == 200, resp.get_json()
    assert r.keys("rl:{b:alice}:*") and r.keys("rl:{u:alice}:*")


def test_the_key_holders_spending_leaves_the_body_id_alone(tmp_path: Path, r: redis.Redis,
                                                           redis_url: str) -> None:
    app = app_with(tmp_path, redis_url)
    client = app.test_client()
    key, _ = app.extensions["llm_limiter"].keys.create("bob")
    body = {"model": "echo", "messages": [{"role": "user", "content": "x"}]}
    codes = [client.post("/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {key}"}).status_code
             for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    assert client.post("/chat", json={"message": "hi", "user_id": "bob"}).status_code == 200


def test_a_provider_key_turns_require_api_key_on(tmp_path: Path, r: redis.Redis, redis_url: str,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with caplog.at_level(logging.INFO, logger="limiter.app"):
        app = app_with(tmp_path, redis_url)
    assert "/chat needs an API key" in caplog.text
    client = app.test_client()
    resp = client.post("/chat", json={"message": "hi", "user_id": "alice"})
    assert resp.status_code == 401 and resp.get_json()["code"] == "unauthorized"
    key, _ = app.extensions["llm_limiter"].keys.create("alice")
    assert client.post("/chat", json={"message": "hi"},
                       headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_require_api_key_0_turns_it_off_and_says_so(tmp_path: Path, r: redis.Redis,
                                                    redis_url: str,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("REQUIRE_API_KEY", "0")
    with caplog.at_level(logging.INFO, logger="limiter.app"):
        app = app_with(tmp_path, redis_url)
    warned = [rec for rec in caplog.records if rec.name == "limiter.app"]
    assert warned and warned[0].levelno == logging.WARNING
    assert "anonymous" in warned[0].getMessage()
    resp = app.test_client().post("/chat", json={"message": "hi", "user_id": "alice"})
    assert resp.status_code == 200


def test_without_provider_keys_the_echo_demo_stays_anonymous(tmp_path: Path, r: redis.Redis,
                                                             redis_url: str) -> None:
    app = app_with(tmp_path, redis_url)
    assert app.config["REQUIRE_API_KEY"] is False
    resp = app.test_client().post("/chat", json={"message": "hi", "user_id": "test-user-1"})
    assert resp.status_code == 200 and resp.get_json() == {"reply": "echo: hi"}


def user_row(remaining: int) -> re.Pattern[str]:
    """The bucket's row of `limits show`: limit 3, then ``remaining``."""
    return re.compile(rf"^user\s+3\s+{remaining}\s", re.M)


def test_limits_show_and_reset_pick_the_namespace(tmp_path: Path, r: redis.Redis,
                                                  redis_url: str) -> None:
    app = app_with(tmp_path, redis_url)
    client = app.test_client()
    runner = app.test_cli_runner()
    for _ in range(2):
        client.post("/chat", json={"message": "hi", "user_id": "carol"})
    shown = runner.invoke(args=["limits", "show", "carol"])
    assert "(/chat user_id)" in shown.output and user_row(1).search(shown.output)

    key, _ = app.extensions["llm_limiter"].keys.create("carol")
    shown = runner.invoke(args=["limits", "show", "carol"])             # a key holder now
    assert "(API key user)" in shown.output and user_row(3).search(shown.output)
    shown = runner.invoke(args=["limits", "show", "carol", "--anonymous"])
    assert "(/chat user_id)" in shown.output and user_row(1).search(shown.output)

    assert runner.invoke(args=["limits", "reset", "carol", "--anonymous"]).exit_code == 0
    assert not r.keys("rl:{b:carol}:*")
    assert key
