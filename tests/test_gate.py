"""The gate (limiting/web/gate.py): who pays is resolved once per request, and the view that
reads the plan and the charge that follows share that one resolution."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from app import create_app
from limiting.core.naming import BODY_USER, KEY_USER
from limiting.core.policy import Policy
from limiting.web.context import request_limits
from limiting.web.extension import current_limiter
from limiting.web.gate import payer
from tests.policies import LOADED, plan, policy, write_policy

PLANS = policy(store=LOADED, per_ip="100000 per minute",
               plans={"starter": plan(100, 100, "1000 per day"),
                      # LLM units: /chat reserves (echo answers in-process), not acquires
                      "metered": plan(100, 100, "1000 per day", tokens_per_minute=1_000_000)},
               users={"m": "metered"})


@pytest.fixture
def app(redis_url: str, tmp_path: Path) -> Flask:
    return create_app({"REDIS_URL": redis_url, "TESTING": True, "REQUIRE_API_KEY": False,
                       "LIMITS_CONFIG": write_policy(tmp_path, PLANS)})


@pytest.fixture
def resolutions(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[Any, ...]]]:
    """Every Policy.resolve call, with its arguments (the real method still answers)."""
    calls: list[tuple[Any, ...]] = []
    real = Policy.resolve

    def counted(self: Policy, *args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Policy, "resolve", counted)
    yield calls


@pytest.mark.parametrize("user", ["s", "m"])   # acquire (starter), reserve (metered)
def test_chat_resolves_its_payer_once(app: Flask, resolutions: list[tuple[Any, ...]],
                                      user: str) -> None:
    client = app.test_client()
    for n in range(3):
        resolutions.clear()
        reply = client.post("/chat", json={"message": "hi", "user_id": user})
        assert reply.status_code == 200, reply.get_json()
        assert "RateLimit" in reply.headers
        assert len(resolutions) == 1, (n, resolutions)


def test_payer_is_kept_for_the_request(app: Flask) -> None:
    with app.test_request_context("/chat", method="POST"):
        policy = current_limiter().policy
        first = payer(policy, "s", None, anonymous=True)
        assert payer(policy, "s", None, anonymous=True) is first
        assert request_limits().payer is first
        assert first.realm == BODY_USER and first.plan.name == "starter" and first.org is None
        other = payer(policy, "s", None)   # the key user of the same name: apart
        assert other is not first and other.realm == KEY_USER
        assert payer(policy, "m", "starter").plan.name == "starter"   # the key's plan
    with app.test_request_context("/chat", method="POST"):
        assert request_limits().payer is None   # a new request resolves again
