"""What a client's own choices can reach (issue 19, items 3, 4, 6 and 9): a name it claims, a
header it adds, a model it names on the other provider's API, where it scrapes /metrics from,
the text of its user id in an operator's CSV.

The app runs in-process (Flask's test client) against the real Valkey, with the real SDKs
calling the fake provider.
"""

from __future__ import annotations

import csv
import io
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from fakeprovider import FakeProvider
from limiting import RateLimiter
from tests.conftest import provider_env, write_policy
from tests.policies import loaded_toml

GPT, CLAUDE = "gpt-4o-mini", "claude-3-5-haiku-latest"
ADMIN = "admin-token-of-at-least-32-characters!"
METRICS = "metrics-token-of-at-least-32-characters"
POLICY = loaded_toml() + f"""
[defaults]
plan = "free"

[plans.free]
burst = 1000
refill_per_second = 100
quotas = ["10000 per day"]
tokens_per_minute = 1000000
budget_usd_per_day = 100

[orgs."acme"]
quotas = ["10000 per day"]

[users]
"victim" = {{ org = "acme" }}

[models."{GPT}"]
provider = "openai"
requests_per_minute = 100000
input_usd_per_million = 100
output_usd_per_million = 400

[models."{CLAUDE}"]
provider = "anthropic"
requests_per_minute = 100000
input_usd_per_million = 100
output_usd_per_million = 400
"""
HELLO = [{"role": "user", "content": "hello big world"}]


@pytest.fixture
def fp(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProvider]:
    yield from provider_env(monkeypatch)  # type: ignore[misc]


def make(tmp_path: Path, redis_url: str, routes: str = "", **config: str) -> Flask:
    """The app on POLICY plus ``routes``; /chat anonymous (REQUIRE_API_KEY off)."""
    return create_app({"REDIS_URL": redis_url, "REQUIRE_API_KEY": "0",
                       "LIMITS_CONFIG": write_policy(tmp_path, POLICY + routes), **config})


def new_key(app: Flask, user: str, org: str | None = None) -> str:
    return app.extensions["llm_limiter"].keys.create(user, "free", org=org)[0]  # type: ignore


def anonymous_chat(client: FlaskClient, user: str, **kw: Any) -> int:
    return client.post("/chat", json={"message": "hi", "user_id": user}, **kw).status_code


def openai_call(client: FlaskClient, key: str, model: str = "echo") -> Any:
    return client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": model, "messages": HELLO, "max_tokens": 16})


def anthropic_call(client: FlaskClient, headers: dict[str, str], model: str = "echo") -> Any:
    return client.post("/v1/messages", headers=headers,
                       json={"model": model, "messages": HELLO, "max_tokens": 16})


# --- item 3: a route limit keyed by user or org keeps the realms apart ---------------------------


def shared_scope(key: str) -> str:
    """/chat and /v1/chat/completions share one "3 per day" scope, counted by ``key``."""
    return "".join(f'[routes."{endpoint}"]\nquotas = ["3 per day"]\nkey = "{key}"\n'
                   f'scope = "talk"\n' for endpoint in ("chat.chat",
                                                       "openai_api.chat_completions"))


@pytest.mark.parametrize("key", ["user", "org"])
def test_an_anonymous_id_never_spends_a_key_holders_route_limits(
        tmp_path: Path, r: redis.Redis, redis_url: str, key: str) -> None:
    """Three anonymous /chat calls claiming "victim" (whose [users] org is acme) used to leave
    the key holder "victim" a 429 on /v1: the claim and the key holder shared one counter."""
    app = make(tmp_path, redis_url, shared_scope(key))
    client = app.test_client()
    victim = new_key(app, "victim")
    assert [anonymous_chat(client, "victim") for _ in range(4)] == [200, 200, 200, 429]
    assert [openai_call(client, victim).status_code for _ in range(4)] == [200, 200, 200, 429]


# --- item 4: key = "key" counts the key that authenticated ---------------------------------------


def test_a_key_limit_counts_the_key_the_dialect_authenticated(
        tmp_path: Path, r: redis.Redis, redis_url: str) -> None:
    """/v1/messages authenticates x-api-key before Bearer: a random Bearer beside the real
    x-api-key made a counter per request (six 200s against "3 per day")."""
    app = make(tmp_path, redis_url,
               '[routes."anthropic_api.messages"]\nquotas = ["3 per day"]\nkey = "key"\n')
    client = app.test_client()
    key, other = new_key(app, "holder"), new_key(app, "holder")

    def call(real: str) -> int:
        return anthropic_call(client, {"x-api-key": real, "Authorization":
                                       f"Bearer llm_{secrets.token_urlsafe(32)}"}).status_code

    assert [call(key) for _ in range(6)] == [200, 200, 200, 429, 429, 429]
    assert call(other) == 200   # a limit per key, not per user


def test_a_key_limit_on_an_anonymous_view_counts_the_address(
        tmp_path: Path, r: redis.Redis, redis_url: str) -> None:
    """Anonymous /chat authenticates no key: a made-up Bearer per request is no key at all,
    so the limit counts the client's address (as with no key)."""
    app = make(tmp_path, redis_url,
               '[routes."chat.chat"]\nquotas = ["3 per day"]\nkey = "key"\n')
    client = app.test_client()
    codes = [anonymous_chat(client, f"anon-{i}", headers={
        "Authorization": f"Bearer llm_{secrets.token_urlsafe(32)}"}) for i in range(4)]
    assert codes == [200, 200, 200, 429]


def test_a_key_limit_on_a_plain_route_counts_only_live_keys(
        tmp_path: Path, r: redis.Redis, redis_url: str) -> None:
    """A route that charges nobody authenticates nothing itself: the limit asks whether the
    presented key is a live one; a made-up one counts the client's address."""
    app = Flask("adopter")
    app.config.update(REDIS_URL=redis_url, LIMITS_CONFIG=write_policy(tmp_path, POLICY))
    limiter = RateLimiter(app)

    @app.get("/report")
    @limiter.sliding_window("3 per day", key="key")
    def report() -> str:
        return "ok"

    client = app.test_client()
    key = limiter.keys.create("reader", "free")[0]
    live = {"Authorization": f"Bearer {key}"}
    assert [client.get("/report", headers=live).status_code for _ in range(4)] == \
        [200, 200, 200, 429]
    made_up = [client.get("/report", environ_overrides={"REMOTE_ADDR": "198.51.100.7"},
                          headers={"X-API-Key": f"llm_{secrets.token_urlsafe(32)}"}
                          ).status_code for _ in range(4)]
    assert made_up == [200, 200, 200, 429]


# --- item 6: each dialect serves only its own provider's models ----------------------------------


def left(app: Flask, user: str) -> dict[str, int]:
    limiter = app.extensions["llm_limiter"]  # type: ignore[attr-defined]
    states = limiter.engine.peek(user, limiter.policy.plans["free"]).states
    return {s.layer.name: s.remaining for s in states}


def guard_left(app: Flask, model: str) -> list[float]:
    limiter = app.extensions["llm_limiter"]  # type: ignore[attr-defined]
    return [s.remaining for s in limiter.engine.peek_model(model).states]


@pytest.mark.parametrize(("path", "model"), [("/v1/messages", GPT),
                                             ("/v1/chat/completions", CLAUDE)])
def test_a_dialect_refuses_the_other_providers_model(
        tmp_path: Path, r: redis.Redis, redis_url: str, fp: FakeProvider, path: str,
        model: str) -> None:
    """404 in the dialect's own shape, before any charge and without an upstream call (was:
    sent through the wrong SDK, its headers learnt into the wrong model's pacing)."""
    app = make(tmp_path, redis_url)
    client = app.test_client()
    key = new_key(app, "caller")
    before, guard_before = left(app, "caller"), guard_left(app, model)
    body = {"model": model, "messages": HELLO, "max_tokens": 16}
    for stream in (False, True):
        resp = client.post(path, headers={"Authorization": f"Bearer {key}"},
                           json={**body, "stream": stream})
        assert resp.status_code == 404, resp.get_data()
        error = resp.get_json()
        if path == "/v1/messages":
            assert error["type"] == "error" and error["error"]["type"] == "not_found_error"
            assert "/v1/chat/completions" in error["error"]["message"]
        else:
            assert error["error"]["code"] == "model_not_found"
            assert error["error"]["type"] == "invalid_request_error"
            assert "/v1/messages" in error["error"]["message"]
    assert fp.requests == []
    assert left(app, "caller") == before
    assert guard_left(app, model) == guard_before
    # Its own provider's models and echo are served as before.
    assert anthropic_call(client, {"x-api-key": key}, CLAUDE).status_code == 200
    assert openai_call(client, key, GPT).status_code == 200
    assert anthropic_call(client, {"x-api-key": key}).status_code == 200
    assert len(fp.requests) == 2


# --- item 9: /metrics needs a token, or a client on this host ------------------------------------


@pytest.mark.parametrize(("environ", "trusted", "served"), [
    ({}, "0", True),                                                  # 127.0.0.1
    ({"REMOTE_ADDR": "::1"}, "0", True),
    ({"REMOTE_ADDR": "::ffff:127.0.0.1"}, "0", True),
    ({"REMOTE_ADDR": "203.0.113.9"}, "0", False),
    ({"REMOTE_ADDR": "10.0.0.2"}, "0", False),                        # private is not local
    ({"HTTP_X_FORWARDED_FOR": "203.0.113.9"}, "0", False),            # a local proxy's client
    ({"HTTP_X_FORWARDED_FOR": "127.0.0.1"}, "0", False),              # not believed
    ({"HTTP_X_REAL_IP": "203.0.113.9"}, "0", False),
    ({"HTTP_FORWARDED": "for=203.0.113.9"}, "0", False),
    ({"HTTP_X_FORWARDED_FOR": "203.0.113.9"}, "1", False),            # as ProxyFix sees it
    ({"HTTP_X_FORWARDED_FOR": "127.0.0.1"}, "1", True),
    ({"HTTP_X_FORWARDED_FOR": "127.0.0.1, 203.0.113.9"}, "1", False),
    ({"HTTP_X_FORWARDED_FOR": "127.0.0.1"}, "2", False),              # a hop short: unknown
    ({"REMOTE_ADDR": "203.0.113.9", "HTTP_X_FORWARDED_FOR": "127.0.0.1"}, "0", False),
])
def test_metrics_without_a_token_only_on_loopback(
        tmp_path: Path, r: redis.Redis, redis_url: str, environ: dict[str, str], trusted: str,
        served: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ADMIN_TOKEN", "METRICS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    client = make(tmp_path, redis_url, TRUSTED_PROXIES=trusted).test_client()
    resp = client.get("/metrics", environ_overrides=environ)
    if served:
        assert resp.status_code == 200 and b"# TYPE" in resp.get_data()
    else:
        assert resp.status_code == 403, resp.get_data()[:200]
        assert resp.get_json()["code"] == "forbidden"
        assert b"llm_limiter" not in resp.get_data()


def test_metrics_need_the_admin_or_metrics_token_when_one_is_set(
        tmp_path: Path, r: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ADMIN_TOKEN set, /metrics (spend per plan and model) is an operator's page too:
    loopback or not, it needs ADMIN_TOKEN or METRICS_TOKEN."""
    monkeypatch.delenv("METRICS_TOKEN", raising=False)
    client = make(tmp_path, redis_url, ADMIN_TOKEN=ADMIN).test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).status_code \
        == 200
    assert client.get("/metrics", auth=("prometheus", ADMIN)).status_code == 200
    both = make(tmp_path, redis_url, ADMIN_TOKEN=ADMIN, METRICS_TOKEN=METRICS).test_client()
    for token in (ADMIN, METRICS):
        assert both.get("/metrics", headers={"Authorization": f"Bearer {token}"}
                        ).status_code == 200
    assert both.get("/metrics").status_code == 401


# --- item 9: the CSV export escapes what a spreadsheet would run ---------------------------------


FORMULAS = ["=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx"]


def test_the_csv_export_escapes_formula_cells(tmp_path: Path, r: redis.Redis,
                                              redis_url: str) -> None:
    """Users named like formulas spend, then appear in the admin's CSV: each such cell is
    prefixed with ' (OWASP's rule), so a spreadsheet shows the text instead of running it;
    a cell holding a CR or LF is quoted, so it cannot split its row."""
    app = make(tmp_path, redis_url, ADMIN_TOKEN=ADMIN)
    client = app.test_client()
    for user in [*FORMULAS, "one\r\nrow"]:
        assert anonymous_chat(client, user) == 200   # echo, metered: booked in the ledger
    admin = {"Authorization": f"Bearer {ADMIN}"}
    resp = client.get("/admin/spend?format=csv&top=50&by=tok", headers=admin)
    assert resp.status_code == 200 and resp.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(resp.get_data(as_text=True), newline="")))
    assert sorted(row["user"] for row in rows) == sorted(
        ["'" + u for u in FORMULAS] + ["one\r\nrow"])   # a CR or LF inside: still one row
    for row in rows:
        for cell in row.values():
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), row
    one = client.get("/admin/spend/user/=1+1?format=csv&realm=b", headers=admin)
    assert one.status_code == 200
    cells = [c for row in csv.reader(io.StringIO(one.get_data(as_text=True), newline=""))
             for c in row]
    assert "'=1+1" in cells and "=1+1" not in cells
