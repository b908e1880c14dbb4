"""Only [models] go upstream, and each is priced for everything it can bill: unknown models and
dated snapshots are refused before any charge, aliases share their model's prices and guard,
cache writes, service tiers and server tools are reserved and settled at their own prices.

The real openai/anthropic SDKs talk to the app in-process (httpx's WSGI transport), the app
talks to the local fake provider, and every layer lives in the real Valkey.
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
from limiting.core.llm import Usage
from limiting.core.policy import ModelPolicy
from limiting.core.pricing import PriceTerms, reserve_usd_micros, usage_usd_micros
from limiting.core.upstream import model_prefix
from limiting.providers import clients
from limiting.providers.llm_calls import anthropic_usage
from tests.conftest import write_policy
from tests.policies import loaded_toml

POLICY = loaded_toml() + """
[defaults]
plan = "roomy"

[plans.roomy]
burst = 1000
refill_per_second = 100
tokens_per_minute = 1000000
budget_usd_per_day = 100
default_max_tokens = 50

[plans.narrow]                  # small enough that a reservation's size shows as a refusal
burst = 1000
refill_per_second = 100
input_tokens_per_minute = 500
output_tokens_per_minute = 1000
budget_usd_per_day = 0.05

[models."gpt-4o"]
provider = "openai"
requests_per_minute = 1000
input_usd_per_million = 2.5
output_usd_per_million = 10
aliases = ["gpt-4o-2024-11-20"]
service_tiers = { priority = 2.0, flex = 0.5 }

[models."claude-sonnet"]
provider = "anthropic"
requests_per_minute = 1000
input_usd_per_million = 3
output_usd_per_million = 15
cached_input_usd_per_million = 0.3
server_tool_usd_per_use = 0.01

[models."claude-plain"]
provider = "anthropic"
input_usd_per_million = 1
output_usd_per_million = 5
"""
GPT4O = "gpt-4o"
HELLO = [{"role": "user", "content": "hello big world"}]
WEB_SEARCH = {"type": "web_search_20250305", "name": "web_search"}
_ids = count()


class Stack:
    def __init__(self, app: Flask, fake: FakeProvider) -> None:
        self.app, self.fake = app, fake
        self.limiter = app.extensions["llm_limiter"]
        # The openai SDK takes an httpx client, the anthropic SDK an httpx2 one.
        self.http = httpx.Client(transport=httpx.WSGITransport(app=app))
        self.http2 = httpx2.Client(transport=httpx2.WSGITransport(app=app))

    def user(self, plan: str = "roomy") -> tuple[str, str]:
        """A fresh user (all layers full) and a key for it."""
        name = f"u{next(_ids)}"
        return name, self.limiter.keys.create(name, plan=plan)[0]

    def oai(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url="http://app/v1", api_key=key, max_retries=0,
                             http_client=self.http)

    def ant(self, key: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url="http://app", api_key=key, max_retries=0,
                                   http_client=self.http2)

    def left(self, user: str, plan: str = "roomy") -> dict[str, int]:
        """Remaining per layer, charging nothing."""
        plan_obj = self.limiter.policy.plans[plan]
        return {s.layer.name: s.remaining for s in self.limiter.engine.peek(user, plan_obj).states}

    def spent_usd(self, user: str, plan: str = "roomy") -> int:
        """Micro-dollars in the user's usd-day window."""
        budget = round(self.limiter.policy.plans[plan].budget_usd_per_day * 1e6)
        return budget - self.left(user, plan)["usd-day"]


@pytest.fixture
def s(tmp_path: Path, r: redis.Redis, redis_url: str,
      monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    with FakeProvider() as fake:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-fake")
        monkeypatch.setenv("OPENAI_BASE_URL", fake.url + "/v1")
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-fake")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
        clients.reset()
        app = create_app({"REDIS_URL": redis_url, "LIMITS_CONFIG": write_policy(tmp_path, POLICY),
                          "REQUIRE_API_KEY": "1"})
        stack = Stack(app, fake)
        yield stack
        stack.http.close()
        stack.http2.close()
        clients.reset()


def full(s: Stack, plan: str = "roomy") -> dict[str, int]:
    return s.left(f"nobody-{next(_ids)}", plan)


# --- models only from the policy ------------------------------------------------------------------


def test_unlisted_snapshot_is_404_in_openai_shape_and_charges_nothing(s: Stack) -> None:
    user, key = s.user()
    with pytest.raises(openai.NotFoundError) as err:
        s.oai(key).chat.completions.create(model="gpt-4o-2024-08-06", messages=HELLO)
    assert err.value.response.json() == {"error": {
        "message": "The model `gpt-4o-2024-08-06` does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": None, "code": "model_not_found"}}
    assert s.left(user) == full(s)
    assert s.fake.requests == []


def test_unlisted_model_is_404_in_anthropic_shape_and_charges_nothing(s: Stack) -> None:
    user, key = s.user()
    with pytest.raises(anthropic.NotFoundError) as err:
        s.ant(key).messages.create(model="claude-3-opus-20240229", max_tokens=5, messages=HELLO)
    assert err.value.response.json() == {
        "type": "error", "error": {"type": "not_found_error",
                                   "message": "model: claude-3-opus-20240229"}}
    assert s.left(user) == full(s)
    assert s.fake.requests == []


def test_unlisted_model_is_400_on_chat_and_charges_nothing(s: Stack) -> None:
    user, key = s.user()
    resp = s.app.test_client().post("/chat", json={"message": "hi", "model": "gpt-4o-2024-08-06"},
                                    headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 400
    assert resp.get_json()["code"] == "model_not_found"
    assert s.left(user) == full(s)
    assert s.fake.requests == []


def test_alias_is_served_priced_and_guarded_as_its_model(s: Stack, r: redis.Redis) -> None:
    user, key = s.user()
    reply = s.oai(key).chat.completions.create(model="gpt-4o-2024-11-20", messages=HELLO)
    assert s.fake.requests[-1].body["model"] == "gpt-4o-2024-11-20"   # upstream: as asked
    usage = reply.usage
    assert usage is not None
    assert s.spent_usd(user) == round(usage.prompt_tokens * 2.5 + usage.completion_tokens * 10)
    # One guard for both names: the model's keys, counted once; none under the alias.
    assert r.keys(model_prefix("rl:", "gpt-4o-2024-11-20") + "*") == []
    assert r.keys(model_prefix("rl:", GPT4O) + "*")
    requests = {st.layer.name: st.remaining for st in s.limiter.engine.peek_model(GPT4O).states}
    assert requests["upstream-requests"] == 999
    s.oai(key).chat.completions.create(model=GPT4O, messages=HELLO)
    requests = {st.layer.name: st.remaining
                for st in s.limiter.engine.peek_model("gpt-4o-2024-11-20").states}
    assert requests["upstream-requests"] == 998


# --- cache writes, tiers, server tools ------------------------------------------------------------

LONG = [{"role": "user", "content": [
    {"type": "text", "text": "word " * 100, "cache_control": {"type": "ephemeral"}}]}]


def test_anthropic_cache_writes_settle_at_their_price(s: Stack) -> None:
    user, key = s.user()
    s.fake.set_cached_tokens(20, 40)
    reply = s.ant(key).messages.create(model="claude-sonnet", max_tokens=20, messages=LONG)
    u = reply.usage
    assert (u.cache_read_input_tokens, u.cache_creation_input_tokens) == (20, 40)
    # Plain input at 3, reads at 0.3, 5-minute writes at 1.25 x 3, output at 15.
    expected = u.input_tokens * 3 + 20 * 0.3 + 40 * 3.75 + u.output_tokens * 15
    assert s.spent_usd(user) == round(expected)


def test_a_streamed_answer_settles_cache_writes_at_their_price(s: Stack) -> None:
    user, key = s.user()
    s.fake.set_cached_tokens(20, 40)
    with s.ant(key).messages.stream(model="claude-sonnet", max_tokens=20,
                                    messages=LONG) as stream:  # type: ignore[arg-type]
        u = stream.get_final_message().usage
    assert (u.cache_read_input_tokens, u.cache_creation_input_tokens) == (20, 40)
    expected = u.input_tokens * 3 + 20 * 0.3 + 40 * 3.75 + u.output_tokens * 15
    assert s.spent_usd(user) == round(expected)


def test_one_hour_cache_writes_and_web_searches_are_read_and_priced() -> None:
    usage = anthropic_usage({"usage": {
        "input_tokens": 10, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 300,
        "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
        "output_tokens": 7, "server_tool_use": {"web_search_requests": 2}}})
    assert usage == Usage(315, 7, 5, cache_write_tokens=100, cache_write_1h_tokens=200,
                          server_tool_uses=2)
    model = ModelPolicy("m", "anthropic", input_usd_per_million=3, output_usd_per_million=15,
                        server_tool_usd_per_use=0.01)
    micros = usage_usd_micros(model, usage)
    assert micros == pytest.approx(10 * 3 + 5 * 1.5 + 100 * 3.75 + 200 * 6 + 7 * 15 + 20_000)
    # A provider's negative count refunds nothing.
    assert anthropic_usage({"usage": {"input_tokens": -50, "output_tokens": -1}}) == Usage(0, 0)


def test_reservation_covers_the_dearest_price_and_settles_the_reported_one(s: Stack) -> None:
    model = s.limiter.policy.model("claude-sonnet")
    terms = PriceTerms(tier=2.0, cache_writes=True, server_tool_uses=3)
    with s.app.test_request_context():
        reservation = s.limiter.reserve("direct", "claude-sonnet", 100, 10, terms=terms)
    # 100 prompt tokens at the 1-hour write price (2 x 3), 10 out at 15, doubled; 3 searches.
    assert s.spent_usd("direct") == (100 * 6 + 10 * 15) * 2 + 30_000
    assert reserve_usd_micros(model, 100, 10, terms) == (100 * 6 + 10 * 15) * 2 + 30_000
    reservation.settle(Usage(100, 4, 10, cache_write_tokens=50, server_tool_uses=1))
    assert s.spent_usd("direct") == round((40 * 3 + 10 * 0.3 + 50 * 3.75 + 4 * 15) * 2 + 10_000)


def test_service_tier_is_priced_or_refused(s: Stack) -> None:
    user, key = s.user()
    reply = s.oai(key).chat.completions.create(model=GPT4O, messages=HELLO,
                                               service_tier="priority")
    usage = reply.usage
    assert usage is not None
    assert s.spent_usd(user) == round((usage.prompt_tokens * 2.5 + usage.completion_tokens * 10)
                                      * 2)
    assert s.fake.requests[-1].body["service_tier"] == "priority"
    before = s.left(user)
    with pytest.raises(openai.BadRequestError) as err:
        s.oai(key).chat.completions.create(model=GPT4O, messages=HELLO, service_tier="scale")
    assert "'scale'" in err.value.response.json()["error"]["message"]
    assert err.value.response.json()["error"]["param"] == "service_tier"
    with pytest.raises(anthropic.BadRequestError) as aerr:
        s.ant(key).messages.create(model="claude-plain", max_tokens=5, messages=HELLO,
                                   service_tier="priority")  # type: ignore[arg-type]
    assert "'priority'" in aerr.value.response.json()["error"]["message"]
    assert s.left(user)["usd-day"] == before["usd-day"]
    s.ant(key).messages.create(model="claude-plain", max_tokens=5, messages=HELLO,
                               service_tier="standard_only")


def test_server_tools_need_a_bound_and_a_price(s: Stack) -> None:
    user, key = s.user()
    fine = {**WEB_SEARCH, "max_uses": 2}
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("claude-sonnet", WEB_SEARCH, "max_uses"),                    # no bound
        ("claude-sonnet", {**WEB_SEARCH, "max_uses": 10**9}, "max_uses"),
        ("claude-plain", fine, "not priced"),                         # no server-tool price
    ]
    for model, tool, fragment in cases:
        with pytest.raises(anthropic.BadRequestError) as err:
            s.ant(key).messages.create(model=model, max_tokens=5, messages=HELLO,
                                       tools=[tool])  # type: ignore[list-item]
        assert fragment in err.value.response.json()["error"]["message"]
    assert s.left(user) == full(s)
    assert s.fake.requests == []
    s.ant(key).messages.create(model="claude-sonnet", max_tokens=5, messages=HELLO,
                               tools=[fine])  # type: ignore[list-item]
    assert s.fake.requests[-1].body["tools"] == [fine]


def test_server_tool_uses_are_reserved(s: Stack) -> None:
    # The narrow plan's $0.05 a day holds two searches at $0.01, never ten.
    _, key = s.user("narrow")
    search = {**WEB_SEARCH, "max_uses": 10}
    with pytest.raises(anthropic.BadRequestError) as err:
        s.ant(key).messages.create(model="claude-sonnet", max_tokens=5, messages=HELLO,
                                   tools=[search])  # type: ignore[list-item]
    assert "usd-day" in err.value.response.json()["error"]["message"]
    s.ant(key).messages.create(model="claude-sonnet", max_tokens=5, messages=HELLO,
                               tools=[{**search, "max_uses": 2}])  # type: ignore[list-item]


# --- what the reservation counts ------------------------------------------------------------------


def test_both_max_token_fields_reserve_the_larger(s: Stack) -> None:
    _, key = s.user("narrow")            # 1,000 output tokens a minute
    with pytest.raises(openai.BadRequestError) as err:
        s.oai(key).chat.completions.create(model=GPT4O, messages=HELLO,
                                           max_completion_tokens=10, max_tokens=2000)
    assert "output-tokens-minute" in err.value.response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        s.oai(key).chat.completions.create(model=GPT4O, messages=HELLO,
                                           max_completion_tokens=2000, max_tokens=10)
    s.oai(key).chat.completions.create(model=GPT4O, messages=HELLO, max_completion_tokens=10,
                                       max_tokens=20)


SCHEMA = {"type": "object", "properties": {f"field_{i}": {"type": "string",
                                                          "description": "x" * 20}
                                           for i in range(40)}}


@pytest.mark.parametrize("extra", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "big", "schema": SCHEMA}}},
    {"functions": [{"name": "big", "parameters": SCHEMA}]},
])
def test_schemas_count_in_the_input_estimate(s: Stack, extra: dict[str, Any]) -> None:
    _, key = s.user("narrow")            # 500 input tokens a minute; the schema is ~1,000
    with pytest.raises(openai.BadRequestError) as err:
        s.oai(key).chat.completions.create(model=GPT4O, messages=HELLO, max_tokens=5,
                                           **extra)
    assert "input-tokens-minute" in err.value.response.json()["error"]["message"]
    assert s.fake.requests == []


def test_prediction_counts_as_output(s: Stack) -> None:
    _, key = s.user("narrow")            # 1,000 output tokens a minute
    text = "predicted " * 1200           # ~1,200 tokens, billed as output when rejected
    with pytest.raises(openai.BadRequestError) as err:
        s.oai(key).chat.completions.create(model=GPT4O, messages=HELLO, max_tokens=5,
                                           prediction={"type": "content", "content": text})
    assert "output-tokens-minute" in err.value.response.json()["error"]["message"]
    assert s.fake.requests == []


# --- media the provider sees and we cannot ----------------------------------------------------

IMAGE = {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}


def test_an_image_by_url_is_reserved_as_the_tokens_it_may_bill(s: Stack) -> None:
    _, key = s.user("narrow")            # 500 input tokens a minute; one image may bill 1,600
    with pytest.raises(openai.BadRequestError) as err:
        s.oai(key).chat.completions.create(model=GPT4O, max_tokens=5, messages=[
            {"role": "user", "content": [{"type": "text", "text": "what is it?"}, IMAGE]}])
    assert "input-tokens-minute" in err.value.response.json()["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as aerr:
        s.ant(key).messages.create(model="claude-sonnet", max_tokens=5, messages=[  # type: ignore[misc]
            {"role": "user", "content": [{"type": "image", "source": {
                "type": "url", "url": "https://example.invalid/cat.png"}}]}])
    assert "input-tokens-minute" in aerr.value.response.json()["error"]["message"]
    assert s.fake.requests == []


def test_a_document_or_file_by_reference_is_refused_before_any_charge(s: Stack) -> None:
    user, key = s.user()
    before = s.left(user)
    with pytest.raises(anthropic.BadRequestError) as aerr:
        s.ant(key).messages.create(model="claude-sonnet", max_tokens=5, messages=[  # type: ignore[misc]
            {"role": "user", "content": [{"type": "document", "source": {
                "type": "url", "url": "https://example.invalid/100-pages.pdf"}}]}])
    assert "cannot be priced" in aerr.value.response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as err:
        s.oai(key).chat.completions.create(model=GPT4O, max_tokens=5, messages=[
            {"role": "user", "content": [{"type": "file", "file": {"file_id": "file-abc"}}]}])
    assert err.value.response.json()["error"]["param"] == "messages"
    assert s.left(user) == before and s.fake.requests == []


def test_image_tokens_are_the_models_own() -> None:
    from limiting.core.llm import estimate_input_tokens
    from limiting.core.policy import parse_policy

    with_image = [{"role": "user", "content": [{"type": "text", "text": "hi"}, IMAGE]}]
    plain = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert estimate_input_tokens(with_image, image_tokens=36_835) \
        >= estimate_input_tokens(plain) + 36_835
    policy = parse_policy({"plans": {"p": {"burst": 1, "refill_per_second": 1}}, "models": {
        "gpt-4o-mini": {"provider": "openai", "image_tokens": 36_835}}})
    assert policy.models["gpt-4o-mini"].image_tokens == 36_835
