"""Refusing at the door (limiting/web/door.py): a caller this worker has just refused is answered
before Flask runs — no hook, no view, no store call — with the very 429 the view would send;
and nobody else is ever refused there, nor loses their body."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from limiting.deny import MAX_STALE, PROBE_SECONDS, DenyCache
from limiting.web.door import MAX_PEEK
from tests.conftest import keyed_app, store_calls, write_policy
from tests.policies import HELD, LOADED, plan, policy

EDGE = policy(store=LOADED, per_ip="2 per minute",
              plans={"starter": plan(1000, 1000, "100000 per day")})


def commands(r: redis.Redis) -> int:
    return store_calls(r)


def scripts(r: redis.Redis) -> int:
    """Scripts Valkey ran so far: key lookups and decisions (the workers' once-a-second
    overrides check is an HGETALL, not counted)."""
    return store_calls(r, "evalsha")


def door_probes(began: float) -> int:
    """How many held requests the deny cache may have let through to ask the store since
    ``began`` (monotonic, taken before the store's refusal): none in an entry's first
    MAX_STALE - PROBE_SECONDS, then one per that long at most (each refusal renews the entry).
    On a quick machine a test's hammering is over before then: 0, and the door answered every
    request alone; on a loaded one the store is asked again as the cache promises."""
    return int((time.monotonic() - began) // (MAX_STALE - PROBE_SECONDS))


# Store commands one held request that went through to Flask may run: the overrides' version
# check, a key lookup, the decision.
PER_PROBE = 3


def _app(url: str, tmp_path: Path, text: str, **config: Any) -> tuple[Flask, list[str]]:
    """The app, and a list each request that reaches Flask appends its path to."""
    app = create_app({"REDIS_URL": url, "LIMITS_CONFIG": write_policy(tmp_path, text),
                      "TESTING": True, **config})
    reached: list[str] = []

    @app.before_request
    def note() -> None:
        from flask import request
        reached.append(request.path)

    return app, reached


def chat(client: FlaskClient, user: str, message: str = "hi", ip: str = "10.0.0.1",
         **kw: Any) -> Any:
    return client.post("/chat", json={"message": message, "user_id": user},
                       environ_base={"REMOTE_ADDR": ip}, **kw)


def _same_refusal(resp: Any, first: Any) -> None:
    """``resp`` is the 429 ``first`` was, counted down: body, headers, Retry-After."""
    assert resp.status_code == 429
    assert resp.mimetype == "application/json"
    body, want = resp.get_json(), first.get_json()
    assert set(body) == set(want) and body["code"] == want["code"] == "rate_limited"
    assert body["layer"] == want["layer"]
    retry = int(resp.headers["Retry-After"])
    assert 1 <= retry <= int(first.headers["Retry-After"]) and body["retry_after"] == retry
    assert body["error"] == want["error"].replace(f"{want['retry_after']}s", f"{retry}s")
    for name in ("RateLimit-Policy", "X-RateLimit-Limit", "X-RateLimit-Remaining"):
        assert resp.headers[name] == first.headers[name]
    assert resp.headers["X-RateLimit-Reset"] == resp.headers["Retry-After"]
    assert resp.headers["RateLimit"].split(";")[0] == first.headers["RateLimit"].split(";")[0]
    assert int(resp.headers["Content-Length"]) == len(resp.get_data())
    assert resp.headers["X-Request-ID"]


def test_an_anonymous_caller_is_refused_at_the_door_whatever_the_message(
        r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    app, reached = _app(redis_url, tmp_path, HELD)
    client = app.test_client()
    assert chat(client, "mallory").status_code == 200
    began = time.monotonic()
    first = chat(client, "mallory")   # the store's refusal, through Flask
    assert first.status_code == 429 and len(reached) == 2
    before = commands(r)
    answers = [chat(client, "mallory", message=f"try {i}", headers={"X-Request-ID": f"r{i}"})
               for i in range(30)]
    probes = door_probes(began)     # 0 unless the machine was slow
    assert len(reached) <= 2 + probes, "the door answers before Flask: no hook ran"
    assert commands(r) - before <= PER_PROBE * probes, "and without a store call"
    for i, resp in enumerate(answers):
        _same_refusal(resp, first)
        assert resp.headers["X-Request-ID"] == f"r{i}"   # the caller's id, echoed
    # Anyone else goes on to Flask, their body whole; so does the held user on a plan change.
    resp = chat(client, "trent", message="é" * 1000)
    assert resp.status_code == 200 and resp.get_json()["reply"].count("é") == 1000
    assert reached[-1] == "/chat"


def test_an_api_key_is_refused_at_the_door_without_looking_it_up(
        r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    app, reached = _app(redis_url, tmp_path, HELD, REQUIRE_API_KEY="1")
    key, _ = app.extensions["llm_limiter"].keys.create("kim")
    client = app.test_client()
    auth = {"Authorization": f"Bearer {key}"}
    assert client.post("/chat", json={"message": "hi"}, headers=auth).status_code == 200
    began = time.monotonic()
    first = client.post("/chat", json={"message": "hi"}, headers=auth)
    assert first.status_code == 429
    seen, before = len(reached), commands(r)
    for i in range(20):
        _same_refusal(client.post("/chat", json={"message": f"m{i}"},
                                  headers={"X-API-Key": key}), first)
    probes = door_probes(began)     # 0 unless the machine was slow
    assert len(reached) - seen <= probes and commands(r) - before <= PER_PROBE * probes, \
        "no Flask, no key lookup"
    # Without the key the request is Flask's to answer (a 401), not the door's.
    assert client.post("/chat", json={"message": "hi", "user_id": "kim"}).status_code == 401
    assert reached[-1] == "/chat"
    # The same key on /v1 is refused at the door in that API's own error shape.
    seen = len(reached)
    resp = client.post("/v1/chat/completions", headers=auth,
                       json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 429 and resp.get_json()["error"]["type"] == "requests"
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"
    resp = client.post("/v1/messages", headers={"x-api-key": key}, json={
        "model": "echo", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 429 and resp.get_json()["error"]["type"] == "rate_limit_error"
    assert len(reached) == seen


def test_a_held_key_sent_along_does_not_refuse_chats_body_user(
        r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    """Without REQUIRE_API_KEY /chat pays by user_id and ignores any key: a key held on /v1
    (so known to the door) that a /chat request also sends must not refuse its body user."""
    app, reached = _app(redis_url, tmp_path, HELD)
    key, _ = app.extensions["llm_limiter"].keys.create("kim")
    client = app.test_client()
    auth = {"Authorization": f"Bearer {key}"}
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    codes = [client.post("/v1/chat/completions", json=body, headers=auth).status_code
             for _ in range(3)]
    assert codes == [200, 429, 429] and len(reached) == 2   # the door holds kim's key
    resp = chat(client, "bob", headers=auth)
    assert resp.status_code == 200 and resp.get_json() == {"reply": "echo: hi"}
    resp = chat(client, "bob", headers={"X-API-Key": key})
    assert resp.status_code == 429 and resp.get_json()["layer"] == "user"   # bob's own burst
    assert len(reached) == 4, "both went to Flask"


VARIANTS = ("openai", "anthropic")
SDK_POLICY = policy(per_ip="100000 per minute", default="held",
                    plans={"held": plan(1, 0.01, "1000 per day")})
HELLO = [{"role": "user", "content": "hello"}]


def _numbers_out(body: object) -> str:
    return re.sub(r"\d+", "N", json.dumps(body, sort_keys=True))


def _sdk_call(url: str, key: str, variant: str) -> Any:
    """One call through the real SDK: the reply, or the RateLimitError it raised."""
    import anthropic
    import openai

    try:
        if variant == "openai":
            return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0).chat.\
                completions.create(model="echo", messages=HELLO)   # type: ignore[arg-type]
        return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0).messages.create(
            model="echo", max_tokens=5, messages=HELLO)   # type: ignore[arg-type]
    except (openai.RateLimitError, anthropic.RateLimitError) as exc:
        return exc


@pytest.mark.slow
def test_the_sdks_see_the_same_refusal_from_the_door_as_from_the_store(
        tmp_path: Path, redis_url: str) -> None:
    redis.Redis.from_url(redis_url).flushall()
    (tmp_path / "limits.toml").write_text(SDK_POLICY)
    env = {"REDIS_URL": redis_url, "LIMITS_CONFIG": str(tmp_path / "limits.toml")}
    r = redis.Redis.from_url(redis_url)
    with keyed_app(tmp_path, env, {v: "held" for v in VARIANTS}, workers=2) as (
            server, _, keys):
        for variant in VARIANTS:
            assert not isinstance(_sdk_call(server.url, keys[variant], variant), Exception)
            first = _sdk_call(server.url, keys[variant], variant)   # the store's, via Flask
            before, began = scripts(r), time.monotonic()
            refusals = [_sdk_call(server.url, keys[variant], variant) for _ in range(40)]
            # Each of the 2 workers asks the store (a key lookup and a decision) until it has
            # learnt the refusal, then once per MAX_STALE - PROBE_SECONDS at most; the rest is
            # the door's (without it: 80 calls; on a quick machine at most 2 * 2 * (1 + 8)).
            asked = scripts(r) - before
            assert asked <= 2 * 2 * (1 + door_probes(began))
            for exc in refusals:
                assert type(exc) is type(first)
                assert exc.status_code == 429
                assert _numbers_out(exc.body) == _numbers_out(first.body)   # waits count down
                assert 1 <= int(exc.response.headers["retry-after"]) <= int(
                    first.response.headers["retry-after"])


def test_an_ip_over_the_edge_is_refused_at_the_door_whatever_user_it_names(
        r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    app, reached = _app(redis_url, tmp_path, EDGE)
    client = app.test_client()
    assert [chat(client, f"u{i}").status_code for i in range(2)] == [200, 200]
    began = time.monotonic()
    first = chat(client, "u2")
    assert first.status_code == 429 and first.get_json()["layer"] == "edge"
    seen, before = len(reached), commands(r)
    for i in range(20):
        _same_refusal(chat(client, f"rotating-{i}"), first)
    probes = door_probes(began)     # 0 unless the machine was slow
    assert len(reached) - seen <= probes and commands(r) - before <= PER_PROBE * probes
    # Another address is not held; nor is a route that is no limited route of the door's;
    # and a preflight is Flask's to answer (OPTIONS never runs the view).
    assert chat(client, "u0", ip="10.0.0.2").status_code == 200
    client.options("/chat", environ_base={"REMOTE_ADDR": "10.0.0.1"})
    assert reached[-1] == "/chat"
    assert client.get("/healthz", environ_base={"REMOTE_ADDR": "10.0.0.1"}).status_code == 200


def test_reset_and_overrides_let_the_caller_through_the_door_at_once(
        r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    app, _ = _app(redis_url, tmp_path, HELD)
    client, cli = app.test_client(), app.test_cli_runner()
    assert chat(client, "oscar").status_code == 200
    assert chat(client, "oscar").status_code == 429
    assert chat(client, "oscar").status_code == 429
    assert cli.invoke(args=["limits", "reset", "oscar", "--anonymous"]).exit_code == 0
    assert chat(client, "oscar").status_code == 200
    assert chat(client, "oscar").status_code == 429
    assert cli.invoke(args=["limits", "set", "oscar", "--plan", "pro", "--anonymous"]
                      ).exit_code == 0
    time.sleep(0.05)   # the bucket's one key, now refilled at pro's 100 a second
    assert chat(client, "oscar").status_code == 200


@pytest.mark.parametrize("body", [
    b'{"message": "hi", "user_id": "mallory"',          # cut short
    b'[' * 100_000,                                      # nested past the parser's depth
    b'{"message": "hi", "user_id": ["mallory"]}',       # not a string
    b'\xff\xfe{}',                                       # not UTF-8
])
def test_a_body_the_door_cannot_read_is_the_views_to_refuse(
        r: redis.Redis, redis_url: str, tmp_path: Path, body: bytes) -> None:
    app, reached = _app(redis_url, tmp_path, HELD)
    client = app.test_client()
    chat(client, "mallory")
    assert chat(client, "mallory").status_code == 429   # held: the door is awake
    resp = client.post("/chat", data=body, content_type="application/json",
                       environ_base={"REMOTE_ADDR": "10.0.0.1"})
    assert resp.status_code == 400 and resp.get_json()["code"]
    assert reached[-1] == "/chat"


def test_a_body_past_the_peek_is_handed_on_unread(
        r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    app, reached = _app(redis_url, tmp_path, HELD)
    client = app.test_client()
    chat(client, "mallory")
    assert chat(client, "mallory").status_code == 429
    seen = len(reached)
    resp = chat(client, "mallory", message="x" * (MAX_PEEK + 10))
    assert resp.status_code == 429 and len(reached) == seen + 1   # Flask's deny cache


def test_aliases_are_bounded_and_cleared_with_the_cache() -> None:
    deny = DenyCache(max_entries=100)
    for i in range(250):
        deny.alias(("key", f"k{i}"), "u", f"user-{i}", "starter")
    assert deny.named(("key", "k0")) is None                      # the oldest went first
    assert deny.named(("key", "k249")) == ("u", "user-249", "starter")
    assert len(deny._aliases) == 100
    deny.clear()
    assert deny.named(("key", "k249")) is None


def test_a_door_that_fails_lets_flask_answer(redis_url: str, r: redis.Redis,
                                             tmp_path: Path) -> None:
    from flask import request

    from limiting import RateLimiter, current_limiter, plan

    def broken(decision: Any) -> Any:
        raise RuntimeError("a renderer with a bug")

    app = Flask(__name__)
    app.config.update(REDIS_URL=redis_url, LIMITS_CONFIG=write_policy(tmp_path, HELD))
    RateLimiter(app)

    @app.post("/ask")
    @plan(user_from="user_id", render=broken)
    def ask() -> dict[str, str]:
        user = request.get_json()["user_id"]
        current_limiter().acquire(user, anonymous=True)
        return {"ok": user}

    client = app.test_client()
    assert client.post("/ask", json={"user_id": "u"}).status_code == 200
    codes = [client.post("/ask", json={"user_id": "u"}).status_code for _ in range(3)]
    assert codes == [429, 429, 429]   # the store's, then Flask's deny cache: never a 500


def test_behind_a_proxy_the_door_holds_the_client_not_the_proxy(
        r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    """The door sits inside ProxyFix: with TRUSTED_PROXIES=1 it sees X-Forwarded-For's client,
    so one client over the edge does not shut out everyone behind the same proxy."""
    app, reached = _app(redis_url, tmp_path, EDGE, TRUSTED_PROXIES="1")
    client = app.test_client()

    def via_proxy(client_ip: str, user: str) -> Any:
        return chat(client, user, ip="10.9.9.9", headers={"X-Forwarded-For": client_ip})

    assert [via_proxy("203.0.113.7", f"u{i}").status_code for i in range(2)] == [200, 200]
    assert via_proxy("203.0.113.7", "u2").status_code == 429   # the store's: the edge
    seen = len(reached)
    assert via_proxy("203.0.113.7", "u3").status_code == 429
    assert len(reached) == seen, "answered at the door"
    assert via_proxy("198.51.100.1", "u4").status_code == 200   # another client, same proxy
