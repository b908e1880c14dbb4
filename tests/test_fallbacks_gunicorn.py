"""Fallback models end to end: gunicorn with three workers on a real Valkey, the real openai and
anthropic SDKs, plain and streamed. When the asked model's guard is full the fallback serves:
the upstream call asks for it (the fake provider reports the model it was asked for), the
response says so in X-Limiter-Served-Model, the ledger books it; ``X-Limiter-Fallback: off``
and a plan with ``fallbacks = false`` get the 429; a stream broken mid-way settles the
served model."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import openai
import pytest
import redis
from flask import Flask

from app import create_app
from limiting.ledger import Ledger
from tests.conftest import keyed_app
from tests.policies import LOADED, plan, policy, served_by

pytestmark = pytest.mark.slow

PRICES = {"input_usd_per_million": 1.0, "output_usd_per_million": 2.0}
MODELS = {
    "gpt-fb-big": served_by("openai", requests_per_minute=2, fallbacks=["gpt-fb-mini"], **PRICES),
    "gpt-fb-mini": served_by("openai", requests_per_minute=100, **PRICES),
    "claude-fb-big": served_by("anthropic", requests_per_minute=2, fallbacks=["claude-fb-mini"],
                               **PRICES),
    "claude-fb-mini": served_by("anthropic", requests_per_minute=100, **PRICES),
}
POLICY = policy(
    store=LOADED, per_ip="100000 per 10 seconds", default="roomy",
    plans={"roomy": plan(500, 50, "10000 per day", budget_usd_per_day=100),
           "strict": plan(500, 50, "10000 per day", fallbacks=False)},
    users={"keyed": "roomy", "strict": "strict"}, models=MODELS)
HELLO = [{"role": "user", "content": "hello"}]
SERVED = "x-limiter-served-model"


@dataclass
class Stack:
    url: str
    fp: Any
    keys: dict[str, str]
    app: Flask

    def booked(self, model: str) -> int:
        """Requests the spend ledger booked to ``model`` today."""
        ledger = Ledger(self.app.extensions["llm_limiter"].engine.store)
        spend = ledger.models(ledger.today(), [model]).get(model)
        return 0 if spend is None else int(spend.json()["requests"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    redis.Redis.from_url(redis_url).flushall()
    folder = tmp_path_factory.mktemp("fallbacks")
    (folder / "limits.toml").write_text(POLICY)
    env = {"REDIS_URL": redis_url, "LIMITS_CONFIG": str(folder / "limits.toml")}
    with keyed_app(folder, env, {"keyed": "roomy", "strict": "strict"}, workers=3) as (
            server, fp, keys):
        yield Stack(server.url, fp, keys, create_app(dict(env)))


def _openai(s: Stack, key: str, model: str, stream: bool, **extra: Any) -> tuple[Any, str]:
    """(X-Limiter-Served-Model or None, the model the answer names)."""
    with openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=HELLO, max_tokens=20, stream=stream, **extra)
        if not stream:
            return raw.headers.get(SERVED), raw.parse().model
        names = {chunk.model for chunk in raw.parse()}
        assert len(names) == 1
        return raw.headers.get(SERVED), names.pop()


def _anthropic(s: Stack, key: str, model: str, stream: bool, **extra: Any) -> tuple[Any, str]:
    with anthropic.Anthropic(base_url=s.url, api_key=key, max_retries=0) as client:
        raw = client.messages.with_raw_response.create(
            model=model, messages=HELLO, max_tokens=20, stream=stream, **extra)
        if not stream:
            return raw.headers.get(SERVED), raw.parse().model
        names = {event.message.model for event in raw.parse() if event.type == "message_start"}
        assert len(names) == 1
        return raw.headers.get(SERVED), names.pop()


DIALECTS = {"openai": (_openai, "gpt-fb-big", "gpt-fb-mini", openai.RateLimitError),
            "anthropic": (_anthropic, "claude-fb-big", "claude-fb-mini",
                          anthropic.RateLimitError)}


@pytest.mark.parametrize("dialect", list(DIALECTS))
def test_a_full_guard_is_served_by_the_fallback(stack: Stack, dialect: str) -> None:
    ask, big, mini, refused = DIALECTS[dialect]
    key = stack.keys["keyed"]
    # The asked model while its guard has room (2 per minute), plain then streamed.
    assert ask(stack, key, big, False) == (None, big)
    assert ask(stack, key, big, True) == (None, big)
    # Then its fallback, named in the header and by the provider that answered.
    assert ask(stack, key, big, False) == (mini, mini)
    assert ask(stack, key, big, True) == (mini, mini)
    asked = [r.body["model"] for r in stack.fp.requests
             if isinstance(r.body, dict) and r.body.get("model") in (big, mini)]
    assert asked[-4:] == [big, big, mini, mini]
    # Turned off by the request's header, or by the plan: the guard's 429.
    with pytest.raises(refused) as exc:
        ask(stack, key, big, False, extra_headers={"X-Limiter-Fallback": "off"})
    assert exc.value.response.headers.get(SERVED) is None
    with pytest.raises(refused):
        ask(stack, stack.keys["strict"], big, True)
    # A client cannot name a fallback of its own: the header only turns them off.
    assert ask(stack, key, big, False, extra_headers={"X-Limiter-Fallback": big})[1] == mini
    # A stream the provider breaks mid-way is still settled, as the model that served it.
    before = stack.booked(mini)
    stack.fp.disconnect_mid_stream(1)
    with pytest.raises(Exception):  # noqa: B017 - the SDKs raise different errors for it
        ask(stack, key, big, True)
    deadline = time.monotonic() + 10
    while stack.booked(mini) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stack.booked(mini) == before + 1
    assert stack.booked(big) == 2
