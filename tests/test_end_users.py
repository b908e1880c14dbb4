"""End users behind a key (``[plans.x] end_user = {...}``): each end user a key holder names
gets the end_user layers, inside the holder's own limits, in the same all-or-nothing call;
scoped to the holder; hostile ids safe. Against the session Valkey, memory:// and a real
Cluster, and through the real openai and anthropic SDKs on the Flask app."""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
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
from limiting.core.ask import Ask
from limiting.core.decision import Refused
from limiting.core.end_users import BadEndUser, limited_end_user
from limiting.core.llm import Usage
from limiting.core.policy import Plan, PolicyError, parse_policy
from limiting.engine import Engine
from limiting.ledger import Ledger
from limiting.stores.storage import open_store
from tests import topologies
from tests.conftest import provider_env, write_policy
from tests.policies import loaded_toml

cluster = topologies.cluster
cluster_url = topologies.cluster_url

# Buckets refill a token per 1000 s: no test here lasts that long.
HOLDER = {"burst": 1000, "refill_per_second": 0.001, "quotas": ["5 per day"]}
END_USER = {"quotas": ["3 per day"], "tokens_per_minute": 1000}
POLICY = {"plans": {"p": {**HOLDER, "end_user": END_USER},
                    "plain": {"burst": 1000, "refill_per_second": 0.001}}}
HOSTILE = ["a" * 256, "ålice 😀", "{tag}", "}{", "a:b", "x\ny", "\ud800", " alice", "Alice",
           "h:" + "0" * 40, '["u", "h", "x"]']


def left(engine: Engine, plan: Plan, holder: str, end_user: str | None = None
         ) -> dict[str, int]:
    """Remaining per layer of ``holder`` (or of their ``end_user``), charging nothing."""
    decision = engine.peek(holder, plan) if end_user is None else \
        engine.peek_end_user(holder, end_user, plan)
    assert decision is not None
    return {s.layer.name: s.remaining for s in decision.states}


@pytest.fixture(params=["valkey", "memory"])
def engine(request: pytest.FixtureRequest) -> Engine:
    """memory:// mirrors the scripts: the same answers."""
    if request.param == "memory":
        return Engine(open_store("memory://"), parse_policy(POLICY))
    redis.Redis.from_url(request.getfixturevalue("redis_url")).flushall()
    return Engine(open_store(request.getfixturevalue("redis_url"), timeout=2.0),
                  parse_policy(POLICY))


def test_end_user_tables_are_checked() -> None:
    for bad, where in (({"alert_at": [0.5]}, "end_user.alert_at"), ({}, "end_user"),
                       ({"quotas": ["3 per day"], "default_max_tokens": 5}, "default_max"),
                       ({"end_user": {"quotas": ["1 per day"]}}, "end_user")):
        with pytest.raises(PolicyError, match=where):
            parse_policy({"plans": {"p": {**HOLDER, "end_user": bad}}})
    assert parse_policy(POLICY).plans["p"].end_user is not None


def test_each_end_user_has_their_own_quota_inside_the_holders(engine: Engine) -> None:
    plan = engine.policy.plans["p"]
    admitted = [engine.acquire("h", plan=plan, end_user="alice").allowed for _ in range(4)]
    assert admitted == [True, True, True, False]
    refused = engine.acquire("h", plan=plan, end_user="alice")
    assert refused.refused is not None and refused.refused.layer.name == "end_user/quota-day"
    assert refused.wait is not None and refused.wait > 0
    assert left(engine, plan, "h")["quota-day"] == 2            # refusals charged nothing
    assert [engine.acquire("h", plan=plan, end_user="bob").allowed for _ in range(3)] == [
        True, True, False]                                       # the holder's 5 are spent
    capped = engine.acquire("h", plan=plan, end_user="carol")
    assert capped.refused is not None and capped.refused.layer.name == "quota-day"
    assert left(engine, plan, "h", "bob")["end_user/quota-day"] == 1
    assert left(engine, plan, "h", "carol")["end_user/quota-day"] == 3   # given nothing
    # Another holder's "alice" is another subject; no end user: the holder's limits alone.
    assert engine.acquire("h2", plan=plan, end_user="alice").allowed
    assert left(engine, plan, "h2", "alice")["end_user/quota-day"] == 2
    assert engine.acquire("h3", plan=plan).allowed
    assert left(engine, plan, "h3")["quota-day"] == 4


def test_a_plan_without_end_user_ignores_the_id(r: redis.Redis, redis_url: str) -> None:
    engine = Engine(open_store(redis_url, timeout=2.0), parse_policy(POLICY))
    plain = engine.policy.plans["plain"]
    engine.acquire("h", plan=plain, end_user="alice")
    engine.reserve("h", plain, Ask("echo", None, 5, 5), renews=False,
                   end_user="alice").settle(Usage(5, 5))
    assert not [k for k in r.scan_iter() if b"{e:" in k or b"spend:e" in k or b"erank" in k]
    assert limited_end_user(plain, 12345) is None                # not even checked
    for bad in (12345, {"a": 1}, ["a"], True, "a" * 257):
        with pytest.raises(BadEndUser):
            limited_end_user(engine.policy.plans["p"], bad)
    assert limited_end_user(engine.policy.plans["p"], "") is None


def test_hostile_ids_are_subjects_of_their_own_and_never_reach_a_key(
        r: redis.Redis, redis_url: str) -> None:
    engine = Engine(open_store(redis_url, timeout=2.0), parse_policy(POLICY))
    plan = engine.policy.plans["p"]
    plan = replace(plan, quotas=())   # the holder unlimited by quota: only end users refuse
    for hostile in HOSTILE:
        assert engine.acquire("h", plan=plan, end_user=hostile).allowed
        assert left(engine, plan, "h", hostile)["end_user/quota-day"] == 2, repr(hostile)
    keys = [k for k in r.scan_iter() if b"{e:" in k]
    assert len(keys) == len(HOSTILE)                            # one quota key each
    for key in keys:
        assert key.count(b"{") == 1 and key.count(b"}") == 1 and len(key) < 80, key
        assert b"alice" not in key and b"tag" not in key and b"\n" not in key


def test_threads_racing_one_end_user_admit_exactly_its_quota(redis_url: str,
                                                             r: redis.Redis) -> None:
    engine = Engine(open_store(redis_url, timeout=2.0), parse_policy(POLICY))
    plan = engine.policy.plans["p"]
    big = replace(plan, quotas=())

    def one(i: int) -> bool:
        if i % 2:
            return engine.acquire("h", plan=big, end_user="racer").allowed
        try:
            engine.reserve("h", big, Ask("echo", None, 10, 10), renews=False,
                           end_user="racer").settle(Usage(10, 4))
            return True
        except Refused:
            return False

    with ThreadPoolExecutor(12) as pool:
        assert sum(pool.map(one, range(24))) == 3
    assert left(engine, big, "h", "racer")["end_user/quota-day"] == 0


def test_reservations_settle_the_end_users_tokens_and_the_ledger_counts_them(
        engine: Engine) -> None:
    plan = engine.policy.plans["p"]
    ask = Ask("echo", None, 100, 400)
    engine.reserve("h", plan, ask, renews=False, end_user="alice").settle(Usage(20, 30))
    engine.reserve("h", plan, ask, renews=False, end_user="bob").settle(Usage(10, 5))
    held = engine.reserve("h", plan, ask, renews=False, end_user="bob")
    assert left(engine, plan, "h", "bob")["end_user/tokens-minute"] == 1000 - 15 - 500
    held.cancel()                                                  # nothing billed: back
    assert left(engine, plan, "h", "alice")["end_user/tokens-minute"] == 1000 - 50
    assert left(engine, plan, "h", "bob")["end_user/tokens-minute"] == 1000 - 15
    over = Ask("echo", None, 600, 500)                             # more than alice has left
    with pytest.raises(Refused) as refused:
        engine.reserve("h", plan, over, renews=False, end_user="alice")
    assert refused.value.decision.refused is not None
    assert refused.value.decision.refused.layer.name == "end_user/tokens-minute"
    ledger = Ledger(engine.store)
    rows = ledger.top_end_users("h", "u", ledger.today(), by="tok")
    assert [(row.end_user, row.score, row.spend.requests) for row in rows] == [
        ("alice", 50, 1), ("bob", 15, 1)]   # a cancelled call books nothing
    assert ledger.top_end_users("h2", "u", ledger.today(), by="tok") == []


def test_on_a_cluster_refusals_give_back_the_other_slots_charge(
        cluster: topologies.Cluster, cluster_url: str) -> None:
    """The holder and each end user in slots of their own: exact, and a refusal by either
    gives back what the other's call charged."""
    holder = f"h-{uuid.uuid4().hex[:8]}"
    pol = parse_policy({"plans": {"p": {**HOLDER, "quotas": ["7 per day"],
                                        "end_user": {"quotas": ["3 per day"]}}}})
    engine = Engine(open_store(cluster_url, timeout=2.0), pol)
    plan = pol.plans["p"]
    names = [f"e{i}" for i in range(4)]

    def one(i: int) -> bool:
        end_user = names[i % 4]
        if i % 2:
            return engine.acquire(holder, plan=plan, end_user=end_user).allowed
        try:
            engine.reserve(holder, plan, Ask("echo", None, 10, 10), renews=False,
                           end_user=end_user).settle(Usage(10, 5))
            return True
        except Refused:
            return False

    with ThreadPoolExecutor(12) as pool:
        assert sum(pool.map(one, range(24))) == 7          # the holder's 7 of 4 x 3
    spent = [3 - left(engine, plan, holder, name)["end_user/quota-day"] for name in names]
    assert sum(spent) == 7 and max(spent) <= 3, spent     # no end user kept a refused charge
    assert left(engine, plan, holder)["quota-day"] == 0


# --- through the Flask app and the real SDKs --------------------------------------------------

PRICED = loaded_toml() + """
[edge]
per_ip = ["100000 per 10 seconds"]

[plans.p]
burst = 1000
refill_per_second = 0.001
quotas = ["100 per day"]
end_user = { quotas = ["2 per day"], tokens_per_minute = 100000 }

[models."gpt-4o-mini"]
provider = "openai"
input_usd_per_million = 100
output_usd_per_million = 400

[models."claude-3-5-haiku-latest"]
provider = "anthropic"
input_usd_per_million = 100
output_usd_per_million = 400
"""
HELLO = [{"role": "user", "content": "hello"}]
ADMIN = "a" * 40


@pytest.fixture
def fp(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProvider]:
    yield from provider_env(monkeypatch)  # type: ignore[misc]


@pytest.fixture
def app(tmp_path: Path, r: redis.Redis, redis_url: str, fp: FakeProvider) -> Flask:
    return create_app({"REDIS_URL": redis_url, "ADMIN_TOKEN": ADMIN,
                       "LIMITS_CONFIG": write_policy(tmp_path, PRICED)})


def test_sdks_name_end_users_and_another_key_cannot_spend_them(app: Flask) -> None:
    limiter = app.extensions["llm_limiter"]
    key, other = limiter.keys.create("saas", "p")[0], limiter.keys.create("rival", "p")[0]
    plan = limiter.policy.plans["p"]
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://app") as http:
        oai = openai.OpenAI(base_url="http://app/v1", api_key=key, max_retries=0,
                            http_client=http)
        ant = anthropic.Anthropic(base_url="http://app", api_key=key, max_retries=0,
                                  http_client=httpx2.Client(
                                      transport=httpx2.WSGITransport(app=app)))
        oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO, user="alice")
        list(ant.messages.create(model="claude-3-5-haiku-latest", max_tokens=20,
                                 messages=HELLO, metadata={"user_id": "alice"}, stream=True))
        with pytest.raises(anthropic.RateLimitError) as refused:
            ant.messages.create(model="claude-3-5-haiku-latest", max_tokens=20,
                                messages=HELLO, metadata={"user_id": "alice"})
        assert refused.value.response.headers["Retry-After"]
        assert "end_user/quota-day" in refused.value.response.text
        # safety_identifier wins over user: "bob" is charged, "alice" refused no more.
        oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO, user="alice",
                                    safety_identifier="bob")
        with pytest.raises(openai.RateLimitError) as again:
            oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO, user="alice")
        assert again.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
        assert again.value.body["layer"] == "end_user/quota-day"  # type: ignore[index]
        # Another key's "alice" is another end user: it spends nothing of saas's alice.
        rival = openai.OpenAI(base_url="http://app/v1", api_key=other, max_retries=0,
                              http_client=http)
        rival.chat.completions.create(model="gpt-4o-mini", messages=HELLO, user="alice")
        assert limiter.engine.peek_end_user("saas", "alice", plan).states[0].remaining == 0
        assert limiter.engine.peek_end_user("rival", "alice", plan).states[0].remaining == 1
        before = [s.remaining for s in limiter.engine.peek("saas", plan).states]
        # Absurd ids: 400 in each dialect's shape, and nothing spent.
        for path, body, auth in (
                ("/v1/chat/completions", {"user": "x" * 257}, "Authorization"),
                ("/v1/chat/completions", {"safety_identifier": 7}, "Authorization"),
                ("/v1/messages", {"metadata": {"user_id": {"a": 1}}, "max_tokens": 5},
                 "x-api-key"),
                ("/v1/messages", {"metadata": "alice", "max_tokens": 5}, "x-api-key")):
            model = "gpt-4o-mini" if "chat" in path else "claude-3-5-haiku-latest"
            answer = http.post(path, json={"model": model, "messages": HELLO, **body},
                               headers={auth: key if auth == "x-api-key" else f"Bearer {key}"})
            assert answer.status_code == 400, answer.text
            error = answer.json()["error"]
            assert error.get("code") == "invalid_request" or error["type"] == \
                "invalid_request_error", error
        assert [s.remaining for s in limiter.engine.peek("saas", plan).states] == before
        spend = http.get("/admin/spend/user/saas",
                         headers={"Authorization": f"Bearer {ADMIN}"}).json()
        top = {row["end_user"]: row for row in spend["end_users"]["top"]}
        assert set(top) == {"alice", "bob"} and top["alice"]["requests"] == 2
        assert top["alice"]["usd_micros"] > top["bob"]["usd_micros"] > 0
        rows = list(csv.DictReader(io.StringIO(http.get(
            "/admin/spend/user/saas?format=csv&days=1",
            headers={"Authorization": f"Bearer {ADMIN}"}).text)))
        assert sorted(row["end_user"] for row in rows if row["end_user"]) == ["alice", "bob"]


def test_hostile_end_user_in_the_ledger_listing(app: Flask) -> None:
    limiter = app.extensions["llm_limiter"]
    key = limiter.keys.create("saas", "p")[0]
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://app") as http:
        for hostile in ("=1+1", "\ud800x", "line\nbreak"):
            # echo: the upstream SDK could not send a lone surrogate on (a 502, before ours)
            body: dict[str, Any] = {"model": "echo", "messages": HELLO, "user": hostile}
            answer = http.post("/v1/chat/completions", content=json.dumps(body),
                               headers={"Authorization": f"Bearer {key}",
                                        "Content-Type": "application/json"})
            assert answer.status_code == 200, answer.text
        admin = {"Authorization": f"Bearer {ADMIN}"}
        listed = http.get("/admin/spend/user/saas?by=tok", headers=admin).json()
        assert {row["end_user"] for row in listed["end_users"]["top"]} == {
            "=1+1", "\ud800x", "line\nbreak"}
        text = http.get("/admin/spend/user/saas?format=csv&by=tok", headers=admin)
        assert text.status_code == 200
        cells = [c for row in csv.reader(io.StringIO(text.text, newline="")) for c in row]
        assert "'=1+1" in cells and "=1+1" not in cells and "line\nbreak" in cells


def test_an_end_users_requests_in_flight_are_leased_and_released(engine: Engine) -> None:
    pol = parse_policy({"plans": {"p": {**HOLDER, "end_user": {"max_concurrent": 1}}}})
    engine = Engine(engine.store, pol)
    plan, ask = pol.plans["p"], Ask("echo", None, 10, 10)
    held = engine.reserve("h", plan, ask, renews=False, end_user="alice")
    with pytest.raises(Refused) as refused:
        engine.reserve("h", plan, ask, renews=False, end_user="alice")
    assert refused.value.decision.refused is not None
    assert refused.value.decision.refused.layer.name == "end_user/concurrent"
    engine.reserve("h", plan, ask, renews=False, end_user="bob").cancel()   # bob's own lease
    held.settle(Usage(10, 3))
    engine.reserve("h", plan, ask, renews=False, end_user="alice").cancel()
    assert left(engine, plan, "h")["quota-day"] == 5 - 3


def test_an_end_user_budget_needs_priced_models() -> None:
    """An unpriced model would spend an end user's dollar budget for free."""
    table = {"plans": {"p": {**HOLDER, "end_user": {"budget_usd_per_day": 1}}},
             "models": {"gpt-x": {"provider": "openai"}}}
    with pytest.raises(PolicyError, match="end_user has budget_usd_per_day"):
        parse_policy(table)
