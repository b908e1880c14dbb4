"""Service tiers (issue 19, item 7): a request that lets the provider choose its tier (none
given, or ``auto``) is reserved at the dearest tier the model lists, and settled at the tier
the answer reports (OpenAI's ``service_tier``, Anthropic's ``usage.service_tier``), plain and
streamed, through the real SDKs against the fake provider serving a dearer tier.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest
import redis
from flask import Flask

from app import create_app
from fakeprovider import FakeProvider
from limiting.core.llm import estimate_input_tokens
from limiting.core.pricing import PriceTerms, reserve_usd_micros, tier_multiplier
from limiting.providers import clients
from tests.conftest import write_policy
from tests.policies import loaded_toml

GPT, CLAUDE = "gpt-4o", "claude-sonnet"
PRICES = {GPT: (2.5, 10.0), CLAUDE: (3.0, 15.0)}
TIERS = {"priority": 2.0, "flex": 0.5}
POLICY = loaded_toml() + f"""
[defaults]
plan = "roomy"
[plans.roomy]
burst = 1000
refill_per_second = 100
budget_usd_per_day = 100
default_max_tokens = 50
[models."{GPT}"]
provider = "openai"
input_usd_per_million = {PRICES[GPT][0]}
output_usd_per_million = {PRICES[GPT][1]}
service_tiers = {{ priority = 2.0, flex = 0.5 }}
[models."{CLAUDE}"]
provider = "anthropic"
input_usd_per_million = {PRICES[CLAUDE][0]}
output_usd_per_million = {PRICES[CLAUDE][1]}
cached_input_usd_per_million = {PRICES[CLAUDE][0]}
service_tiers = {{ priority = 2.0 }}
"""
HELLO = [{"role": "user", "content": "hello big wide world"}]
_ids = count()


class Stack:
    def __init__(self, app: Flask, fake: FakeProvider) -> None:
        self.app, self.fake = app, fake
        self.limiter = app.extensions["llm_limiter"]
        self.http = httpx.Client(transport=httpx.WSGITransport(app=app))
        self.http2 = httpx2.Client(transport=httpx2.WSGITransport(app=app))

    def key(self) -> tuple[str, str]:
        name = f"tier{next(_ids)}"
        return name, self.limiter.keys.create(name, plan="roomy")[0]

    def spent(self, user: str) -> int:
        """Micro-dollars in the user's usd-day window."""
        plan = self.limiter.policy.plans["roomy"]
        left = {s.layer.name: s.remaining for s in self.limiter.engine.peek(user, plan).states}
        return 100_000_000 - left["usd-day"]

    def call(self, key: str, model: str, stream: bool, **extra: Any) -> None:
        """One call through the model's own SDK, read to its end."""
        if model == GPT:
            oai = openai.OpenAI(base_url="http://app/v1", api_key=key, max_retries=0,
                                http_client=self.http)
            if stream:
                for _ in oai.chat.completions.create(model=model, messages=HELLO,  # type: ignore
                                                     max_tokens=20, stream=True, **extra):
                    pass
            else:
                oai.chat.completions.create(model=model, messages=HELLO,  # type: ignore
                                            max_tokens=20, **extra)
            return
        ant = anthropic.Anthropic(base_url="http://app", api_key=key, max_retries=0,
                                  http_client=self.http2)
        if stream:
            with ant.messages.stream(model=model, messages=HELLO,  # type: ignore[arg-type]
                                     max_tokens=20, **extra) as events:
                for _ in events:
                    pass
        else:
            ant.messages.create(model=model, messages=HELLO, max_tokens=20,  # type: ignore
                                **extra)


@pytest.fixture
def s(tmp_path: Path, r: redis.Redis, redis_url: str,
      monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    prices = {m: {"input": p[0], "output": p[1]} for m, p in PRICES.items()}
    with FakeProvider(prices=prices) as fake:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-fake")
        monkeypatch.setenv("OPENAI_BASE_URL", fake.url + "/v1")
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-fake")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
        clients.reset()
        app = create_app({"REDIS_URL": redis_url, "REQUIRE_API_KEY": "1",
                          "LIMITS_CONFIG": write_policy(tmp_path, POLICY)})
        stack = Stack(app, fake)
        try:
            yield stack
        finally:
            stack.http.close()
            stack.http2.close()
            clients.reset()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("model,tier", [(GPT, None), (GPT, "auto"), (CLAUDE, None),
                                        (CLAUDE, "auto")])
def test_a_tier_the_provider_chose_is_charged_at_its_price(s: Stack, model: str,
                                                           tier: str | None,
                                                           stream: bool) -> None:
    """The fake serves requests that leave the tier open at priority (x2), as a project
    default or Anthropic's priority capacity does: the charge is the provider's bill."""
    s.fake.set_service_tier("priority", TIERS)
    user, key = s.key()
    s.call(key, model, stream, **({} if tier is None else {"service_tier": tier}))
    s.fake.quiesce()
    billed = s.fake.meter().usd * 1e6
    assert billed > 0
    assert s.spent(user) >= billed - 1, "served at priority, charged at the standard price"
    assert s.spent(user) <= billed + 1


def test_the_reservation_is_at_the_dearest_tier_the_request_allows(s: Stack) -> None:
    model = s.limiter.policy.model(GPT)
    assert tier_multiplier(model, None) == tier_multiplier(model, "auto") == 2.0
    assert tier_multiplier(model, "default") == 1.0
    assert tier_multiplier(model, "flex") == 0.5
    claude = s.limiter.policy.model(CLAUDE)
    assert tier_multiplier(claude, None) == 2.0
    assert tier_multiplier(claude, "standard_only") == 1.0
    # A stream cut before any usage report is charged as reserved: at the dearest tier.
    s.fake.set_service_tier("priority", TIERS)
    s.fake.set_chunk_delay(0.05)
    user, key = s.key()
    oai = openai.OpenAI(base_url="http://app/v1", api_key=key, max_retries=0,
                        http_client=s.http)
    stream = oai.chat.completions.create(model=GPT, messages=HELLO,  # type: ignore[arg-type]
                                         max_tokens=20, stream=True)
    next(iter(stream))
    stream.close()
    s.fake.quiesce()
    reserved = reserve_usd_micros(model, estimate_input_tokens(HELLO, model=GPT), 20,
                                  PriceTerms(tier=2.0))
    assert abs(s.spent(user) - reserved) <= 1
    assert s.spent(user) >= s.fake.meter().usd * 1e6
