"""The HTTP contract of /chat: headers, 429 bodies, bad input, edge, health."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from flask import Flask, request
from flask.testing import FlaskClient

from app import create_app
from tests.conftest import write_policy
from tests.policies import LOADED, STARTER_AND_PRO, policy, served_by

# A loaded box's store budget: /healthz PINGs within it, and at 50 ms a parallel run's PING
# could miss it (a 503 where the test asks whether the edge exempts the route).
POLICY = policy(store=LOADED, per_ip="30 per minute", default="starter", plans=STARTER_AND_PRO,
                users={"vip": "pro"}, models={"gpt-4o": served_by("openai")})


@pytest.fixture
def app(tmp_path: Path, r: redis.Redis, redis_url: str) -> Flask:
    return create_app({"REDIS_URL": redis_url, "LIMITS_CONFIG": write_policy(tmp_path, POLICY),
                       "TESTING": True})



def chat(client: FlaskClient, user: str = "u1", message: str = "hello", **extra: object):
    return client.post("/chat", json={"message": message, "user_id": user, **extra})


def test_ten_pass_then_429_with_honest_body_and_headers(client: FlaskClient) -> None:
    # starter: a burst of 10 refilled at 0.5 a second. Calls slower than the machine usually
    # makes them may honestly pass one more per 2 s they took, and find the next token
    # nearer than 2 s; on a quick machine (under a second) it is exactly 10 and 2 s.
    began = time.monotonic()
    codes = [chat(client).status_code for _ in range(15)]
    passed = codes.count(200)
    assert 10 <= passed <= 10 + int((time.monotonic() - began) * 0.5), codes
    assert codes == [200] * passed + [429] * (15 - passed)
    r = chat(client)
    quick = time.monotonic() - began < 1.0
    body = r.get_json()
    assert body["code"] == "rate_limited" and body["layer"] == "user"
    assert body["retry_after"] == int(r.headers["Retry-After"])
    assert body["retry_after"] == 2 if quick else 1 <= body["retry_after"] <= 2
    assert r.headers["X-RateLimit-Remaining"] == "0"
    assert r.headers["RateLimit-Policy"] == (
        '"edge";q=30;w=60, "user";q=10;w=20, "quota-day";q=100;w=86400')


def test_every_response_of_a_limited_route_has_headers(client: FlaskClient) -> None:
    r = chat(client)
    assert r.status_code == 200 and r.get_json() == {"reply": "echo: hello"}
    assert r.headers["X-RateLimit-Limit"] == "10"
    assert r.headers["X-RateLimit-Remaining"] == "9"
    assert r.headers["X-RateLimit-Reset"] == "2"
    assert r.headers["RateLimit"].startswith(
        '"edge";r=29;t=60, "user";r=9;t=2, "quota-day";r=99;t=')


def test_plan_from_users_table(client: FlaskClient) -> None:
    began = time.monotonic()
    codes = [chat(client, "vip").status_code for _ in range(22)]
    # pro's burst of 20 (starter's is 10); pro refills 2 a second, so 22 calls slower than
    # half a second may honestly pass one more per half second they took.
    assert 20 <= codes.count(200) <= 20 + int((time.monotonic() - began) * 2)


def test_edge_refuses_per_ip_before_user_layers(client: FlaskClient, r: redis.Redis) -> None:
    codes = [chat(client, f"user-{i}").status_code for i in range(32)]
    assert codes == [200] * 30 + [429] * 2
    resp = chat(client, "fresh-user")
    body = resp.get_json()
    assert body["layer"] == "edge" and body["code"] == "rate_limited"
    assert 1 <= body["retry_after"] <= 61
    assert resp.headers["Retry-After"] == str(body["retry_after"])
    # the edge refusal charged nothing to the user's own layers
    assert r.exists("rl:{u:fresh-user}:b") == 0


def test_edge_rides_in_the_acquire_call_on_flask_limiters_own_key(
    client: FlaskClient, r: redis.Redis
) -> None:
    for i in range(5):
        chat(client, f"k{i}")
    assert r.get("LIMITS:LIMITER/edge/127.0.0.1/global/30/1/minute") == b"5"
    # Turned away for bad input, an attempt still counts at the edge.
    client.post("/chat", data=b"{oops", content_type="application/json")
    assert r.get("LIMITS:LIMITER/edge/127.0.0.1/global/30/1/minute") == b"6"


def test_edge_by_flask_limiter_alone_on_memory_store(tmp_path: Path) -> None:
    app = create_app({"REDIS_URL": "memory://", "LIMITS_CONFIG": write_policy(tmp_path, POLICY)})
    client = app.test_client()
    codes = [chat(client, f"m{i}").status_code for i in range(32)]
    assert codes == [200] * 30 + [429] * 2
    assert chat(client, "m99").get_json()["layer"] == "edge"


def test_spoofed_forwarded_for_does_not_reset_edge(client: FlaskClient) -> None:
    for i in range(30):
        chat(client, f"s{i}")
    r = client.post("/chat", json={"message": "x", "user_id": "s99"},
                    headers={"X-Forwarded-For": "203.0.113.9"})
    assert r.status_code == 429 and r.get_json()["layer"] == "edge"


@pytest.mark.parametrize(("data", "kwargs", "fragment"), [
    (b"{not json", {}, "not valid JSON"),
    (b"[1, 2]", {}, "JSON object"),
    (b"", {}, "JSON object"),
    (b'{"message": 5, "user_id": "u"}', {}, "'message' must be a string"),
    (b'{"message": "hi", "user_id": ["u"]}', {}, "'user_id' must be a string"),
    (b'{"message": "hi"}', {}, "'user_id' is required"),
    (b'{"message": "hi", "user_id": "u", "model": 3}', {}, "'model' must be a string"),
    (b'{"message": "hi", "user_id": "' + b"x" * 300 + b'"}', {}, "longer than"),
])
def test_bad_input_is_400_json_and_charges_nothing(
    client: FlaskClient, r: redis.Redis, data: bytes, kwargs: dict, fragment: str
) -> None:
    resp = client.post("/chat", data=data, content_type="application/json")
    assert resp.status_code == 400
    body = resp.get_json()
    assert body["code"] == "invalid_request" and fragment in body["error"]
    assert not r.keys("rl:*")


def test_unknown_model_is_400(client: FlaskClient, r: redis.Redis) -> None:
    resp = chat(client, model="no-such-model")
    assert resp.status_code == 400 and resp.get_json()["code"] == "model_not_found"
    resp = chat(client, model="gpt-4o")   # no OPENAI_API_KEY in the test environment
    assert resp.status_code == 400 and "OPENAI_API_KEY" in resp.get_json()["error"]
    assert resp.get_json()["code"] == "invalid_model"
    assert not r.keys("rl:*")


def test_body_over_one_mib_is_413(client: FlaskClient) -> None:
    big = b'{"message": "' + b"a" * (1024 * 1024 + 10) + b'", "user_id": "u"}'
    resp = client.post("/chat", data=big, content_type="application/json")
    assert resp.status_code == 413 and resp.get_json()["code"] == "payload_too_large"


def test_not_found_and_wrong_method_are_json(client: FlaskClient) -> None:
    assert client.get("/nope").get_json()["code"] == "not_found"
    resp = client.get("/chat")
    assert resp.status_code == 405 and resp.get_json()["code"] == "method_not_allowed"


def test_healthz_is_exempt_from_edge(client: FlaskClient) -> None:
    for _ in range(40):
        assert client.get("/healthz").status_code == 200


def test_exempt_views_and_blueprints_skip_flask_limiter_others_keep_the_edge(
        app: Flask) -> None:
    """RateLimiter.exempt keeps Flask-Limiter's three hooks off a view and off a Blueprint's
    views (its check resolves every limit before it looks at an exemption: the largest part
    of an exempt probe's time). A route that charges nobody and is not exempt is still
    checked by it, and refused at the edge's 30 a minute."""
    from dataclasses import replace

    from flask import Blueprint

    limiter = app.extensions["llm_limiter"]
    hooks = limiter.gate.edge_hooks
    assert hooks is not None            # one server: the gate runs Flask-Limiter's hooks
    ran: list[str] = []

    def check() -> None:
        ran.append(request.path)
        hooks.check()

    limiter.gate.edge_hooks = replace(hooks, check=check)
    probes = Blueprint("probes", __name__)

    @probes.get("/probe/ready")
    def ready() -> str:
        return "ready"

    limiter.exempt(probes)
    app.register_blueprint(probes)

    @app.get("/live")
    @limiter.exempt
    def live() -> str:
        return "live"

    @app.get("/plain")
    def plain() -> str:
        return "plain"

    client = app.test_client()
    for _ in range(40):
        assert client.get("/live").status_code == 200
        assert client.get("/probe/ready").status_code == 200
        assert client.get("/healthz").status_code == 200
    assert ran == []
    codes = [client.get("/plain").status_code for _ in range(31)]
    assert codes == [200] * 30 + [429] and ran == ["/plain"] * 31


def test_hostile_user_ids_stay_in_their_own_slot(client: FlaskClient, r: redis.Redis) -> None:
    for uid in ["a}b", "{u:victim}", "x:y", "é" * 10, "victim}:q86400"]:
        assert chat(client, uid).status_code == 200
    for key in r.keys("rl:*"):
        text = key.decode()
        assert text.count("{") == 1 and text.count("}") == 1
    assert r.exists("rl:{u:victim}:b") == 0


def test_store_down_fails_closed_for_quotas(tmp_path: Path) -> None:
    app = create_app({"REDIS_URL": "redis://127.0.0.1:1", "TESTING": True,
                      "LIMITS_CONFIG": write_policy(tmp_path, POLICY)})
    resp = chat(app.test_client())
    assert resp.status_code == 503
    assert resp.get_json()["code"] == "limiter_unavailable" and resp.headers["Retry-After"] == "1"


def test_store_down_fails_open_without_paid_quotas(tmp_path: Path) -> None:
    policy = "[plans.free]\nburst = 5\nrefill_per_second = 1\n"
    app = create_app({"REDIS_URL": "redis://127.0.0.1:1", "TESTING": True,
                      "LIMITS_CONFIG": write_policy(tmp_path, policy)})
    assert chat(app.test_client()).status_code == 200


def test_bad_policy_fails_at_start_naming_file_key_reason(tmp_path: Path, redis_url: str) -> None:
    path = write_policy(tmp_path, "[plans.a]\nburst = 'ten'\nrefill_per_second = 1\n")
    with pytest.raises(ValueError, match=r"limits.toml: plans.a.burst: must be an integer"):
        create_app({"REDIS_URL": redis_url, "LIMITS_CONFIG": path})


def test_require_api_key_takes_the_user_from_the_key(tmp_path: Path, r: redis.Redis,
                                                      redis_url: str) -> None:
    app = create_app({"REDIS_URL": redis_url, "LIMITS_CONFIG": write_policy(tmp_path, POLICY),
                      "REQUIRE_API_KEY": "1"})
    client = app.test_client()
    key, _ = app.extensions["llm_limiter"].keys.create("vip", plan="pro")
    assert client.post("/chat", json={"message": "hi"}).status_code == 401
    assert client.post("/chat", json={"message": "hi"},
                       headers={"Authorization": "Bearer llm_nope"}).status_code == 401
    auth = {"Authorization": f"Bearer {key}"}
    resp = client.post("/chat", json={"message": "hi"}, headers=auth)
    assert resp.status_code == 200 and resp.headers["X-RateLimit-Limit"] == "20"   # pro plan
    other = client.post("/chat", json={"message": "hi", "user_id": "someone-else"}, headers=auth)
    assert other.status_code == 403 and other.get_json()["code"] == "forbidden"
    assert client.post("/chat", json={"message": "hi", "user_id": "vip"},
                       headers={"X-API-Key": key}).status_code == 200


def test_metrics_count_decisions_and_refusals(client: FlaskClient) -> None:
    for _ in range(12):
        chat(client, "metered")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'llm_limiter_decisions_total{layer="user",outcome="refused",plan="starter"}' in text
    assert "llm_limiter_decision_seconds_bucket" in text


def test_refusals_are_logged_as_json_without_secrets(client: FlaskClient, capsys) -> None:
    import json
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("limiter").addHandler(handler)
    began = time.monotonic()
    try:
        for _ in range(11):
            resp = chat(client, "logged", message="my secret prompt")
        for _ in range(5):    # a loaded box may have earned a token meanwhile: on to a refusal
            if resp.status_code == 429:
                break
            resp = chat(client, "logged", message="my secret prompt")
    finally:
        logging.getLogger("limiter").removeHandler(handler)
    from limiting.web.logs import JsonFormatter

    line = JsonFormatter().format(records[-1])
    event = json.loads(line)
    assert event["event"] == "refused" and event["user"] == "logged"
    # The next token 2 s away at 0.5 a second, less what refilled: under a second, exactly 2.
    quick = time.monotonic() - began < 1.0
    assert event["layer"] == "user"
    assert event["retry_after"] == 2 if quick else 1 <= event["retry_after"] <= 2
    assert event["request_id"] == resp.headers["X-Request-ID"]
    assert "secret prompt" not in line


def test_request_over_a_limit_it_can_never_meet_is_400_not_429(tmp_path: Path, r: redis.Redis,
                                                                redis_url: str) -> None:
    policy = POLICY.replace('quotas = ["100 per day"]',
                            'quotas = ["100 per day"]\noutput_tokens_per_minute = 100', 1)
    app = create_app({"REDIS_URL": redis_url, "LIMITS_CONFIG": write_policy(tmp_path, policy)})
    resp = chat(app.test_client())   # reserves the plan's default 1,024 output tokens
    assert resp.status_code == 400 and "Retry-After" not in resp.headers
    body = resp.get_json()
    assert body["code"] == "exceeds_limit" and body["layer"] == "output-tokens-minute"


def test_every_limited_route_sends_each_rate_limit_header_once(app: Flask,
                                                               client: FlaskClient) -> None:
    key, _ = app.extensions["llm_limiter"].keys.create("header-user")
    hello = [{"role": "user", "content": "hi"}]
    responses = [
        chat(client),
        client.post("/v1/chat/completions", json={"model": "echo", "messages": hello},
                    headers={"Authorization": f"Bearer {key}"}),
        client.post("/v1/chat/completions", json={"model": "echo", "messages": hello,
                                                  "stream": True},
                    headers={"Authorization": f"Bearer {key}"}),
        client.post("/v1/messages", json={"model": "echo", "max_tokens": 10, "messages": hello},
                    headers={"x-api-key": key}),
    ]
    for resp in responses:
        assert resp.status_code == 200, resp.get_data(as_text=True)
        for name in ("RateLimit-Policy", "RateLimit", "X-RateLimit-Limit",
                     "X-RateLimit-Remaining", "X-RateLimit-Reset"):
            assert len(resp.headers.getlist(name)) == 1, (resp.request.path, name)


def test_request_limits_belong_to_one_request(app: Flask) -> None:
    """The decision, request id and limited-route flag live with the request, not the app
    context: a client used inside one app context starts every request afresh."""
    from limiting import request_limits

    client = app.test_client()
    with app.app_context():
        assert chat(client).status_code == 200
        with app.test_request_context("/chat", method="POST"):
            limits = request_limits()
            assert limits.decision is None and limits.request_id is None
            assert limits.is_limited_route() and request_limits() is limits
        assert client.get("/healthz").headers.get("X-RateLimit-Limit") is None
