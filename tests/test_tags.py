"""Tags on API keys: ``flask keys create USER --tag project=search`` and ``[tags."..."]``
limits shared by every key bearing the tag, decided in the key's own all-or-nothing call;
tags come from the key record only; the ledger counts spend per tag. Against the session
Valkey and memory://, through the Flask test client and the real openai SDK."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from fakeprovider import FakeProvider
from limiting.core.policy import parse_policy
from limiting.engine import Engine
from limiting.stores.storage import open_store
from tests.conftest import provider_env, write_policy
from tests.policies import loaded_toml

TAG = "project=search"
TAG_LAYER = f"tag:{TAG}/quota-day"
POLICY = loaded_toml() + f"""
[edge]
per_ip = ["100000 per 10 seconds"]

[plans.p]
burst = 100
refill_per_second = 0.001
quotas = ["50 per day"]

[tags."{TAG}"]
quotas = ["5 per day"]

[tags."env=prod"]
burst = 1000
refill_per_second = 0.001

[models."gpt-4o-mini"]
provider = "openai"
input_usd_per_million = 100
output_usd_per_million = 400
"""
ADMIN = "admin-token-" + "x" * 32
HELLO = [{"role": "user", "content": "hi"}]


def app_of(tmp_path: Path, url: str) -> Flask:
    return create_app({"REDIS_URL": url, "LIMITS_CONFIG": write_policy(tmp_path, POLICY),
                       "REQUIRE_API_KEY": "1", "ADMIN_TOKEN": ADMIN})


@pytest.fixture(params=["redis", "memory"])
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Flask:
    if request.param == "memory":
        return app_of(tmp_path, "memory://")
    request.getfixturevalue("r")   # flushed
    return app_of(tmp_path, request.getfixturevalue("redis_url"))


def make_key(app: Flask, user: str, *tags: str) -> str:
    made = app.test_cli_runner().invoke(
        args=["keys", "create", user, *[arg for tag in tags for arg in ("--tag", tag)]])
    assert made.exit_code == 0, made.output
    return made.output.strip().splitlines()[-1]


def v1(client: FlaskClient, key: str, **more: object):
    return client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "echo", "messages": HELLO, "max_tokens": 5, **more})


def tag_left(app: Flask, tag: str = TAG) -> dict[str, int]:
    engine = app.extensions["llm_limiter"].engine
    return {s.layer.name: s.remaining for s in engine.peek_tag(engine.policy.tags[tag]).states}


def own_left(app: Flask, user: str) -> int:
    engine = app.extensions["llm_limiter"].engine
    decision = engine.peek(user, engine.policy.plans["p"])
    return next(s.remaining for s in decision.states if s.layer.name == "quota-day")


# --- keys -----------------------------------------------------------------------------------------


def test_cli_create_with_tags_keeps_them_and_refuses_bad_ones(app: Flask) -> None:
    runner = app.test_cli_runner()
    made = runner.invoke(args=["keys", "create", "alice", "--tag", TAG, "--tag", "env=prod"])
    assert made.exit_code == 0, made.output
    assert f"tags env=prod,{TAG}" in made.output
    key = made.output.strip().splitlines()[-1]
    limiter = app.extensions["llm_limiter"]
    record = limiter.authenticate(key)
    assert record is not None and record.tags == ("env=prod", TAG)
    listed = runner.invoke(args=["keys", "list", "--user", "alice"])
    assert re.search(rf"alice\s+p\s.*\sno\s+env=prod,{TAG}$", listed.output, re.M), \
        listed.output
    for bad in (["--tag", "nope"], ["--tag", "a=b c"], ["--tag", "=x"], ["--tag", "a,b=c"],
                ["--tag", "project=a", "--tag", "project=b"]):
        refused = runner.invoke(args=["keys", "create", "alice", *bad])
        assert refused.exit_code == 2, (bad, refused.output)
        assert refused.output.startswith("error: ") and "tag" in refused.output
        assert "Traceback" not in refused.output
    # Only the one good key was made; it keeps its tags once revoked too.
    assert [r.tags for r in limiter.keys.list("alice")] == [("env=prod", TAG)]
    assert runner.invoke(args=["keys", "revoke", record.key_id]).exit_code == 0
    assert limiter.keys.list("alice")[0].tags == ("env=prod", TAG)
    plain = limiter.authenticate(make_key(app, "bob"))
    assert plain is not None and plain.tags == ()


# --- limits -----------------------------------------------------------------------------------


def test_two_keys_of_one_tag_share_its_quota_exactly(app: Flask) -> None:
    """Threads racing two tagged keys of two users: exactly the tag's quota passes; a refusal
    names the tag's layer with Retry-After and charges nothing else; a key without the tag
    is not limited by it."""
    keys = {"ann": make_key(app, "ann", TAG), "ben": make_key(app, "ben", TAG, "env=prod")}
    plain = make_key(app, "cat")

    def call(i: int) -> tuple[str, int]:
        user = "ann" if i % 2 else "ben"
        return user, v1(app.test_client(), keys[user]).status_code

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(16)))
    admitted = [user for user, code in results if code == 200]
    assert len(admitted) == 5 and len(results) - len(admitted) == 11, results
    assert tag_left(app) == {TAG_LAYER: 0}
    # Each user's own quota counted only their admitted calls: refusals charged nothing.
    assert own_left(app, "ann") == 50 - admitted.count("ann")
    assert own_left(app, "ben") == 50 - admitted.count("ben")
    assert tag_left(app, "env=prod") == {"tag:env=prod/rate": 1000 - admitted.count("ben")}
    refused = v1(app.test_client(), keys["ann"])
    assert refused.status_code == 429
    assert TAG_LAYER in refused.get_json()["error"]["message"]
    assert int(refused.headers["Retry-After"]) >= 1
    free = v1(app.test_client(), plain)
    assert free.status_code == 200
    assert "tag:" not in free.headers["RateLimit-Policy"]


def test_a_request_cannot_add_or_remove_tags(app: Flask) -> None:
    tagged, plain = make_key(app, "ann", TAG), make_key(app, "cat")
    client = app.test_client()
    # A key without the tag naming it every way a client could: nothing of the tag's is met.
    sneaky = {"X-Tags": TAG, "X-Tag": TAG, "X-Limiter-Tags": TAG}
    answer = client.post("/v1/chat/completions",
                         headers={"Authorization": f"Bearer {plain}", **sneaky},
                         json={"model": "echo", "messages": HELLO, "max_tokens": 5,
                               "metadata": {"tags": TAG, "tag": TAG}})
    assert answer.status_code == 200 and "tag:" not in answer.headers["RateLimit-Policy"]
    # A field OpenAI does not know is refused as OpenAI refuses it, before anything is charged.
    unknown = v1(client, plain, tags=[TAG], tag=TAG)
    assert unknown.status_code == 400 and unknown.get_json()["error"]["param"] in ("tags", "tag")
    chat = client.post("/chat", headers={"X-API-Key": plain, "X-Tags": TAG},
                       json={"message": "hi", "tags": [TAG], "tag": TAG})
    assert chat.status_code == 200, chat.get_json()
    assert tag_left(app) == {TAG_LAYER: 5}
    # The tagged key asking for no tags (or others) meets its tag all the same.
    shed = client.post("/v1/chat/completions",
                       headers={"Authorization": f"Bearer {tagged}", "X-Tags": ""},
                       json={"model": "echo", "messages": HELLO, "max_tokens": 5,
                             "metadata": {"tags": ""}})
    assert shed.status_code == 200
    assert f'"{TAG_LAYER}";r=4' in shed.headers["RateLimit"]
    chat = client.post("/chat", headers={"X-API-Key": tagged}, json={"message": "hi",
                                                                     "tags": []})
    assert chat.status_code == 200 and tag_left(app) == {TAG_LAYER: 3}
    mine = client.get("/v1/usage", headers={"Authorization": f"Bearer {tagged}"}).get_json()
    assert mine["tags"] == [TAG] and {x["layer"] for x in mine["layers"]} >= {TAG_LAYER}


def test_tags_without_a_table_add_no_group_and_tag_layers_ride_in_one_call(
        r: redis.Redis, redis_url: str) -> None:
    pol = parse_policy({"plans": {"p": {"burst": 10, "refill_per_second": 0.001}},
                        "tags": {TAG: {"quotas": ["1 per day"]}}})
    engine = Engine(open_store(redis_url, timeout=2.0), pol)
    bare = engine.planner.request("u", None, pol.plans["p"], "u",
                                  tags=engine.tag_tables(["env=dev", "team=x"]))
    assert len(bare.groups) == 1   # no table: no layers, no keys, no store work
    plan = engine.planner.request("u", None, pol.plans["p"], "u",
                                  tags=engine.tag_tables(["env=dev", TAG]))
    assert [g.role.value for g in plan.groups] == ["plan", "tag"]
    assert plan.calls(one_server=True) == [plan.groups]
    assert engine.acquire("u", tags=[TAG]).allowed
    refused = engine.acquire("v", tags=[TAG])
    assert refused.refused is not None and refused.refused.layer.name == TAG_LAYER
    assert engine.acquire("v", tags=["env=dev"]).allowed


# --- the ledger -------------------------------------------------------------------------------


@pytest.fixture
def fp(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProvider]:
    yield from provider_env(monkeypatch)  # type: ignore[misc]


def test_spend_per_tag_on_the_admin_endpoint_and_the_cli(app: Flask, fp: FakeProvider) -> None:
    keys = {"ann": make_key(app, "ann", TAG), "ben": make_key(app, "ben", TAG, "env=prod"),
            "cat": make_key(app, "cat", "env=prod")}
    usd = {}
    with httpx.Client(transport=httpx.WSGITransport(app=app)) as http:
        for user, key in keys.items():
            sdk = openai.OpenAI(base_url="http://app/v1", api_key=key, max_retries=0,
                                http_client=http)
            reply = sdk.chat.completions.create(model="gpt-4o-mini", max_tokens=50,
                                                messages=HELLO)
            assert reply.usage is not None
            usd[user] = reply.usage.prompt_tokens * 100 + reply.usage.completion_tokens * 400
    admin = {"Authorization": f"Bearer {ADMIN}"}
    client = app.test_client()
    got = client.get(f"/admin/spend?tag={TAG}", headers=admin).get_json()
    assert got["tag"] == TAG
    assert {row["user"]: row["score"] for row in got["top"]} == {"ann": usd["ann"],
                                                                 "ben": usd["ben"]}
    assert got["total"]["usd_micros"] == usd["ann"] + usd["ben"]
    assert got["total"]["requests"] == 2 and got["daily"][-1] == got["total"]
    prod = client.get("/admin/spend?tag=env=prod&by=tok", headers=admin).get_json()
    assert {row["user"] for row in prod["top"]} == {"ben", "cat"}
    assert prod["total"]["usd_micros"] == usd["ben"] + usd["cat"]
    for bad in ("tag=nope", "tag=a%20b=c", f"tag={TAG}&model=gpt-4o-mini"):
        answer = client.get(f"/admin/spend?{bad}", headers=admin)
        assert answer.status_code == 400, bad
    runner = app.test_cli_runner()
    top = runner.invoke(args=["spend", "top", "--tag", TAG])
    assert top.exit_code == 0, top.output
    assert re.search(r"^ann\s", top.output, re.M) and re.search(r"^ben\s", top.output, re.M)
    assert not re.search(r"^cat\s", top.output, re.M)
    assert f"{(usd['ann'] + usd['ben']) / 1e6:.6f}" in top.output   # the tag's total
    assert runner.invoke(args=["spend", "top", "--tag", "team=none"]).exit_code == 1
    bad = runner.invoke(args=["spend", "top", "--tag", "nope"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_a_tags_alert_at_names_the_tag() -> None:
    """Each tag group's crossings are read by its own table (the pairing follows the order
    the groups were charged in), with realm "tag" and the tag as subject."""
    from limiting.alerts import crossings_of
    from limiting.stores.memory import MemoryStore

    pol = parse_policy({"plans": {"p": {"burst": 10, "refill_per_second": 0.001}},
                        "tags": {"a=z": {"quotas": ["9 per day"]},
                                 "t=a": {"quotas": ["2 per day"], "alert_at": [0.5]}}})
    engine = Engine(MemoryStore(), pol)
    tags = ["a=z", "t=a"]
    outcome = engine.acquire_with("u", None, pol.plans["p"], "u", (), tags=tags)
    found = crossings_of(outcome.charged, "u", "u", pol.plans["p"], None, 0.0,
                         engine.tag_tables(tags))
    assert [(c.subject, c.realm, c.layer, c.threshold) for c in found] == [
        ("t=a", "tag", "tag:t=a/quota-day", 0.5)]


def test_limits_show_and_reset_a_tag(app: Flask) -> None:
    key = make_key(app, "ann", TAG)
    assert v1(app.test_client(), key).status_code == 200
    runner = app.test_cli_runner()
    shown = runner.invoke(args=["limits", "show", "--tag", TAG])
    assert shown.exit_code == 0 and re.search(rf"{re.escape(TAG_LAYER)}\s+5\s+4\s", shown.output)
    for bad in (["show", "--tag", "team=none"], ["show", "ann", "--tag", TAG],
                ["reset", "--tag", TAG, "--layer", "nope"]):
        assert runner.invoke(args=["limits", *bad]).exit_code == 2, bad
    reset = runner.invoke(args=["limits", "reset", "--tag", TAG, "--layer", "quota-day"])
    assert reset.exit_code == 0 and "1 key(s) removed" in reset.output, reset.output
    assert tag_left(app) == {TAG_LAYER: 5} and own_left(app, "ann") == 49   # hers stays
