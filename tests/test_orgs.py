"""Orgs above users: ``[orgs."acme"]`` limits shared by every member, decided in the members'
own all-or-nothing call, against the session Valkey (and a real Cluster), through the Flask
test client and the real openai SDK."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import REGISTRY
from redis.crc import key_slot

from app import create_app
from fakeprovider import FakeProvider
from limiting.core.ask import Ask
from limiting.core.decision import Refused
from limiting.core.llm import Usage
from limiting.core.naming import org_prefix, user_prefix
from limiting.core.orgs import compile_org
from limiting.core.policy import PolicyError, parse_policy
from limiting.engine import Engine
from limiting.stores.storage import open_store
from tests import topologies
from tests.conftest import provider_env, write_policy
from tests.policies import loaded_toml

cluster = topologies.cluster
cluster_url = topologies.cluster_url

# The buckets refill a token per 1000 s (0.001 a second): no test here lasts that long, so a
# bucket read before and after a call changes only by what the call charged, however slow the
# machine. (At 100 a second, Alice's bucket gained a token between two reads on a busy box.)
POLICY = loaded_toml() + """
[plans.p]
burst = 100
refill_per_second = 0.001
quotas = ["50 per day"]

[orgs."acme"]
quotas = ["3 per day"]

[orgs."beta"]
burst = 10
refill_per_second = 0.001

[users]
"alice" = { plan = "p", org = "acme" }
"bob" = { org = "acme" }
"carol" = "p"
"""
PLAN = {"burst": 100, "refill_per_second": 100}


def left(app: Flask, user: str, anonymous: bool = True) -> dict[str, int]:
    """Remaining per layer of ``user`` and their org, charging nothing."""
    limiter = app.extensions["llm_limiter"]
    realm = "b" if anonymous else "u"
    decision = limiter.engine.peek(user, limiter.policy.resolve(user), realm,
                                   limiter.policy.org_of(user))
    return {s.layer.name: s.remaining for s in decision.states}


def app_of(tmp_path: Path, redis_url: str, text: str = POLICY, keys: str = "0") -> Flask:
    """The app on ``text``; /chat takes body user_ids unless ``keys`` is "1"."""
    return create_app({"REDIS_URL": redis_url, "LIMITS_CONFIG": write_policy(tmp_path, text),
                       "REQUIRE_API_KEY": keys})


@pytest.fixture
def app(tmp_path: Path, r: redis.Redis, redis_url: str) -> Flask:
    return app_of(tmp_path, redis_url)



def chat(client: FlaskClient, user: str, **headers: str):
    return client.post("/chat", json={"message": "hi", "user_id": user}, headers=headers)


# --- the policy file ------------------------------------------------------------------------------


def test_orgs_parse_any_subset_and_users_take_a_table() -> None:
    pol = parse_policy({"plans": {"p": PLAN, "q": PLAN}, "defaults": {"plan": "q"},
                        "orgs": {"acme": {"quotas": ["5 per week"], "tokens_per_day": 9000,
                                          "budget_usd_per_month": 30, "max_concurrent": 4,
                                          "mode": "shadow"},
                                 "beta": {"burst": 5, "refill_per_second": 0.5}},
                        "users": {"alice": {"plan": "p", "org": "acme"}, "bob": {"org": "beta"},
                                  "carol": "p", "dan": {"plan": "p"}}}, "t.toml")
    assert dict(pol.users) == {"alice": "p", "bob": "q", "carol": "p", "dan": "p"}
    assert dict(pol.user_orgs) == {"alice": "acme", "bob": "beta"}
    assert pol.org_of("alice") is pol.orgs["acme"] and pol.org_of("carol") is None
    assert pol.org_of("carol", "beta") is pol.orgs["beta"]      # a key's org wins
    assert pol.org_of("alice", "gone") is pol.orgs["acme"]      # a removed org: the user's
    acme = compile_org(pol.orgs["acme"], llm=True)
    assert [(x.name, x.shadow) for x in acme.layers] == [
        ("org:acme/quota-week", True), ("org:acme/tokens-day", True),
        ("org:acme/usd-month", True), ("org:acme/concurrent", True)]
    assert [x.name for x in compile_org(pol.orgs["beta"]).layers] == ["org:beta/rate"]
    assert '"org:acme/quota-week";q=5;w=604800' in acme.policy_header


@pytest.mark.parametrize(("tables", "reason"), [
    ({"users": {"alice": {"org": "nope"}}},
     "users.\"alice\".org: names no org under [orgs]: 'nope'"),
    ({"users": {"alice": {"plan": "nope"}}},
     "users.\"alice\".plan: names no plan under [plans]: 'nope'"),
    ({"users": {"alice": "nope"}}, "users.\"alice\": names no plan under [plans]: 'nope'"),
    ({"users": {"alice": {"org": "acme", "team": "x"}}},
     "users.\"alice\".team: unknown key (a typo?)"),
    ({"users": {"alice": 3}}, "users.\"alice\": must be a plan name or a table"),
    ({"orgs": {"acme": {"quotas": ["0 per day"]}}},
     "orgs.\"acme\".quotas[0]: '0 per day' must allow at least 1"),
    ({"orgs": {"acme": {"burst": 5}}}, "orgs.\"acme\".refill_per_second: is required"),
    ({"orgs": {"acme": {"tokens_per_day": -5}}},
     "orgs.\"acme\".tokens_per_day: must be a positive number, got -5"),
    ({"orgs": {"acme": {"default_max_tokens": 5}}},
     "orgs.\"acme\".default_max_tokens: unknown key (a typo?)"),
    ({"orgs": {"acme": {"mode": "dry"}}}, "orgs.\"acme\".mode: must be one of enforce, shadow"),
    ({"orgs": {"acme": {"budget_usd_per_day": 5}}, "models": {"m": {"provider": "openai"}}},
     "models.\"m\".input_usd_per_million: is required while orgs.\"acme\" has "
     "budget_usd_per_day"),
])
def test_bad_org_config_names_file_key_and_reason(tables: dict[str, object],
                                                  reason: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy({"plans": {"p": PLAN}, "orgs": {"acme": {}}, **tables}, "t.toml")
    assert str(err.value).startswith(f"t.toml: {reason}"), str(err.value)


# --- shared by the members, in one call -----------------------------------------------------------


def test_two_members_share_the_org_quota_and_a_refusal_charges_nothing(
        app: Flask, client: FlaskClient) -> None:
    for _ in range(3):
        assert chat(client, "alice").status_code == 200
    before = {"alice": left(app, "alice"), "bob": left(app, "bob")}
    assert before["bob"]["org:acme/quota-day"] == 0 and before["bob"]["quota-day"] == 50
    refused = chat(client, "bob")
    assert refused.status_code == 429
    body = refused.get_json()
    assert body["layer"] == "org:acme/quota-day" and body["code"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) >= 1
    assert '"org:acme/quota-day";q=3;w=86400' in refused.headers["RateLimit-Policy"]
    assert '"quota-day";q=50' in refused.headers["RateLimit-Policy"]
    # Bob's own layers and the org's are as they were: the refusal charged nothing anywhere.
    assert left(app, "bob") == before["bob"] and left(app, "alice") == before["alice"]
    assert chat(client, "carol").status_code == 200     # no org: not limited by acme's


def test_a_members_own_refusal_charges_the_org_nothing(tmp_path: Path, r: redis.Redis,
                                                       redis_url: str) -> None:
    app = app_of(tmp_path, redis_url,
                 POLICY.replace('quotas = ["50 per day"]', 'quotas = ["1 per day"]'))
    client = app.test_client()
    assert chat(client, "alice").status_code == 200
    response = chat(client, "alice")
    assert response.status_code == 429 and response.get_json()["layer"] == "quota-day"
    assert left(app, "bob")["org:acme/quota-day"] == 2      # only the admitted one counted


def test_org_layers_in_headers_usage_and_the_cli(app: Flask, client: FlaskClient) -> None:
    ok = chat(client, "alice")
    assert '"org:acme/quota-day";r=2' in ok.headers["RateLimit"]
    runner = app.test_cli_runner()
    shown = runner.invoke(args=["limits", "show", "alice", "--anonymous"])
    assert shown.exit_code == 0, shown.output
    assert "plan p  org acme" in shown.output
    assert re.search(r"org:acme/quota-day\s+3\s+2\s", shown.output), shown.output
    org = runner.invoke(args=["limits", "show", "--org", "acme", "--anonymous"])
    assert re.search(r"org:acme/quota-day\s+3\s+2\s", org.output), org.output
    assert runner.invoke(args=["limits", "show", "--org", "nope"]).exit_code == 2
    reset = runner.invoke(args=["limits", "reset", "--org", "acme", "--anonymous",
                                "--layer", "quota-day"])
    assert reset.exit_code == 0 and "1 key(s) removed" in reset.output, reset.output
    assert left(app, "alice")["org:acme/quota-day"] == 3
    assert left(app, "alice")["quota-day"] == 49             # the member's own stays


def test_a_shadow_org_counts_but_never_refuses(tmp_path: Path, r: redis.Redis,
                                               redis_url: str) -> None:
    app = app_of(tmp_path, redis_url,
                 POLICY.replace('[orgs."acme"]\n', '[orgs."acme"]\nmode = "shadow"\n'))
    client = app.test_client()
    name = {"layer": "org:acme/quota-day"}
    before = REGISTRY.get_sample_value("llm_limiter_would_refuse_total", name) or 0
    for _ in range(5):
        response = chat(client, "bob")
        assert response.status_code == 200
    assert '"org:acme/quota-day";r=0' in response.headers["RateLimit"]
    assert REGISTRY.get_sample_value("llm_limiter_would_refuse_total", name) == before + 2


# --- keys -----------------------------------------------------------------------------------------


def test_keys_create_org_charges_the_keys_org_over_users(tmp_path: Path, r: redis.Redis,
                                                         redis_url: str) -> None:
    app = app_of(tmp_path, redis_url, keys="1")
    runner = app.test_cli_runner()
    made = runner.invoke(args=["keys", "create", "alice", "--org", "beta"])
    assert made.exit_code == 0 and "org beta" in made.output, made.output
    key = made.output.strip().splitlines()[-1]
    listed = runner.invoke(args=["keys", "list", "--user", "alice"])
    assert re.search(r"alice\s+p\s+beta\s", listed.output), listed.output
    bad = runner.invoke(args=["keys", "create", "alice", "--org", "nope"])
    assert bad.exit_code == 2 and "unknown org 'nope'; valid orgs: acme, beta" in bad.output
    limiter = app.extensions["llm_limiter"]
    # The real SDK on the in-process app: the key's org (beta) is charged, not [users]' acme.
    with httpx.Client(transport=httpx.WSGITransport(app=app)) as http:
        sdk = openai.OpenAI(base_url="http://app/v1", api_key=key, max_retries=0,
                            http_client=http)
        raw = sdk.chat.completions.with_raw_response.create(
            model="echo", messages=[{"role": "user", "content": "hi"}])
        assert '"org:beta/rate"' in raw.headers["RateLimit-Policy"]
        mine = app.test_client().get("/v1/usage", headers={"Authorization": f"Bearer {key}"})
    assert mine.get_json()["org"] == "beta"
    assert {x["layer"] for x in mine.get_json()["layers"]} >= {"org:beta/rate", "user"}
    beta = limiter.engine.peek_org(limiter.policy.orgs["beta"])
    assert beta.states[0].remaining == 9
    acme = limiter.engine.peek_org(limiter.policy.orgs["acme"])
    assert acme.states[0].remaining == 3
    # /chat with the key: the key's org again.
    assert app.test_client().post("/chat", json={"message": "hi"},
                                  headers={"X-API-Key": key}).status_code == 200
    assert limiter.engine.peek_org(limiter.policy.orgs["beta"]).states[0].remaining == 8


# --- tokens and dollars through /v1 ---------------------------------------------------------------

PRICED = loaded_toml() + """
[plans.p]
burst = 100
refill_per_second = 100
tokens_per_minute = 100000

[orgs."acme"]
tokens_per_minute = 5000
budget_usd_per_day = 50
max_concurrent = 3

[users]
"alice" = { plan = "p", org = "acme" }

[models."gpt-4o-mini"]
provider = "openai"
input_usd_per_million = 100
output_usd_per_million = 400
"""


@pytest.fixture
def fp(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProvider]:
    yield from provider_env(monkeypatch)  # type: ignore[misc]


def test_org_tokens_and_dollars_settle_to_actual_usage_through_v1(
        tmp_path: Path, r: redis.Redis, redis_url: str, fp: FakeProvider) -> None:
    app = create_app({"REDIS_URL": redis_url, "LIMITS_CONFIG": write_policy(tmp_path, PRICED)})
    limiter = app.extensions["llm_limiter"]
    key = limiter.keys.create("alice", "p")[0]
    with httpx.Client(transport=httpx.WSGITransport(app=app)) as http:
        sdk = openai.OpenAI(base_url="http://app/v1", api_key=key, max_retries=0,
                            http_client=http)
        reply = sdk.chat.completions.create(model="gpt-4o-mini", max_tokens=200,
                                            messages=[{"role": "user",
                                                       "content": "hello big world"}])
        assert reply.usage is not None
        used = reply.usage.prompt_tokens + reply.usage.completion_tokens
        stream = sdk.chat.completions.create(model="gpt-4o-mini", max_tokens=200, stream=True,
                                             stream_options={"include_usage": True},
                                             messages=[{"role": "user",
                                                        "content": "hello big world"}])
        chunks = list(stream)
    streamed = chunks[-1].usage
    assert streamed is not None
    used += streamed.prompt_tokens + streamed.completion_tokens
    usd = (2 * 7) * 100 + (2 * 4) * 400   # micro-dollars: 7 in, 4 out, twice
    org = {s.layer.name: s.remaining
           for s in limiter.engine.peek_org(limiter.policy.orgs["acme"]).states}
    assert org["org:acme/tokens-minute"] == 5000 - used
    assert org["org:acme/usd-day"] == 50_000_000 - usd
    assert org["org:acme/concurrent"] == 3                       # both leases released
    own = {s.layer.name: s.remaining for s in limiter.engine.peek(
        "alice", limiter.policy.plans["p"]).states}
    assert own["tokens-minute"] == 100000 - used


def test_org_lease_is_shared_and_released(r: redis.Redis, redis_url: str) -> None:
    pol = parse_policy({"plans": {"p": PLAN}, "orgs": {"acme": {"max_concurrent": 1}}})
    engine = Engine(open_store(redis_url, timeout=2.0), pol)
    plan, org = pol.plans["p"], pol.orgs["acme"]
    ask = Ask("echo", None, 10, 10)
    held = engine.reserve("u1", plan, ask, org=org, renews=False)
    with pytest.raises(Refused) as refused:
        engine.reserve("u2", plan, ask, org=org, renews=False)
    assert refused.value.decision.refused is not None
    assert refused.value.decision.refused.layer.name == "org:acme/concurrent"
    assert engine.peek("u2", plan).states[0].remaining == 100     # u2 charged nothing
    held.settle(Usage(10, 3))
    engine.reserve("u2", plan, ask, org=org, renews=False).cancel()


# --- a Cluster: the org in a slot of its own ------------------------------------------------------


def test_org_on_a_cluster_is_exact_and_gives_refused_members_their_charge_back(
        cluster: topologies.Cluster, cluster_url: str) -> None:
    name = f"acme-{uuid.uuid4().hex[:8]}"
    pol = parse_policy({"plans": {"p": {**PLAN, "quotas": ["1000 per day"]}},
                        "orgs": {name: {"quotas": ["30 per day"], "tokens_per_minute": 100000}}})
    engine = Engine(open_store(cluster_url, timeout=2.0), pol)
    plan, org = pol.plans["p"], pol.orgs[name]
    users = [f"m{i}-{uuid.uuid4().hex[:6]}" for i in range(80)]
    prefix = org_prefix("rl:", name)
    assert {key_slot(user_prefix("rl:", u).encode()) for u in users} \
        - {key_slot(prefix.encode())}           # members live in other slots
    half = len(users) // 2

    def one(user: str) -> bool:
        if users.index(user) < half:
            return engine.acquire(user, plan=plan, org=org).allowed
        try:
            engine.reserve(user, plan, Ask("echo", None, 10, 10), org=org,
                           renews=False).settle(Usage(10, 5))
            return True
        except Refused as exc:
            assert exc.decision.refused is not None
            assert exc.decision.refused.layer.name == f"org:{name}/quota-day"
            return False

    with ThreadPoolExecutor(16) as pool:
        admitted = list(pool.map(one, users))
    assert sum(admitted) == 30
    for user, ok in zip(users, admitted, strict=True):
        quota = {s.layer.name: s.remaining for s in engine.peek(user, plan).states}
        assert quota["quota-day"] == (999 if ok else 1000), user   # refused: given back
    org_left = {s.layer.name: s.remaining for s in engine.peek_org(org).states}
    assert org_left[f"org:{name}/quota-day"] == 0
    settled = sum(ok for i, ok in enumerate(admitted) if i >= half)
    assert org_left[f"org:{name}/tokens-minute"] == 100000 - 15 * settled
