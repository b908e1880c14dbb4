"""Issue 9, items 7, 9, 10, 11 (plans): absurd numbers, the store away, removed plans, the
key's plan for operators, slow and oversized bodies, admin and metrics credentials."""

from __future__ import annotations

import logging
import select
import socket
from functools import partial
from pathlib import Path

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from limiting import current_limiter
from tests.conftest import free_port, write_policy
from tests.policies import LOADED, plan, policy, served_by

ADMIN = "admin-token-that-is-at-least-32-chars-long"
PLANS = {"starter": plan(2, 0.01, "100 per day"),
         "pro": plan(20, 1, "1000 per day", tokens_per_minute=100000)}
with_plans = partial(policy, store={"local_fallback": True, **LOADED}, per_ip="10000 per minute",
                     default="starter",
                     models={"gpt-4o": served_by("openai", requests_per_minute=500)})
POLICY = with_plans(plans=PLANS)
# The same policy after the operator removed "pro" (its keys still name it).
WITHOUT_PRO = with_plans(plans={"starter": PLANS["starter"]})


def make_app(folder: Path, url: str, policy: str = POLICY, **config: object) -> Flask:
    folder.mkdir(parents=True, exist_ok=True)
    return create_app({"REDIS_URL": url, "LIMITS_CONFIG": write_policy(folder, policy),
                       "ADMIN_TOKEN": ADMIN, **config})


@pytest.fixture
def app(tmp_path: Path, r: redis.Redis, redis_url: str) -> Flask:
    return make_app(tmp_path, redis_url)



def new_key(app: Flask, user: str, plan: str | None = None) -> str:
    with app.app_context():
        return current_limiter().keys.create(user, plan)[0]


def away_url() -> str:
    """A Redis URL where nothing listens: the store is away."""
    return f"redis://127.0.0.1:{free_port()}"


# --- item 7: every number bounded -----------------------------------------------------------------

ABSURD = [10**400, 1e308, -1, 0, True, "5", 1_000_001, 2**63]
ABSURD_IDS = ["10**400", "1e308", "-1", "0", "true", "str5", "1000001", "2**63"]


@pytest.mark.parametrize("value", ABSURD, ids=ABSURD_IDS)
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_openai_token_limits_are_bounded(app: Flask, client: FlaskClient, field: str,
                                         value: object) -> None:
    key = new_key(app, "num-user", "pro")
    resp = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "echo", "messages": [{"role": "user", "content": "hi"}],
                             field: value})
    assert resp.status_code == 400, resp.get_data()[:300]
    error = resp.get_json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == field


@pytest.mark.parametrize("value", ABSURD, ids=ABSURD_IDS)
def test_anthropic_max_tokens_is_bounded(app: Flask, client: FlaskClient, value: object) -> None:
    key = new_key(app, "num-user", "pro")
    resp = client.post("/v1/messages", headers={"x-api-key": key},
                       json={"model": "echo", "max_tokens": value,
                             "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 400, resp.get_data()[:300]
    body = resp.get_json()
    assert body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]


def test_the_cap_itself_is_served(app: Flask, client: FlaskClient) -> None:
    key = new_key(app, "num-user", "pro")
    resp = client.post("/v1/messages", headers={"x-api-key": key},
                       json={"model": "echo", "max_tokens": 1_000,
                             "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200, resp.get_data()[:300]


# --- item 7: the store away is a 503, everywhere --------------------------------------------------

def assert_unavailable(resp: object) -> None:
    status = resp.status_code  # type: ignore[attr-defined]
    assert status == 503, resp.get_data()[:300]  # type: ignore[attr-defined]
    assert int(resp.headers["Retry-After"]) >= 1  # type: ignore[attr-defined]
    assert b"limiter_unavailable" in resp.get_data()  # type: ignore[attr-defined]


def test_every_endpoint_answers_503_while_the_store_is_away(tmp_path: Path) -> None:
    app = make_app(tmp_path, away_url(), REQUIRE_API_KEY="1")
    client = app.test_client()
    key = "llm_" + "k" * 43          # well formed, so it costs a lookup in the store
    bearer = {"Authorization": f"Bearer {key}"}
    assert_unavailable(client.get("/v1/usage", headers=bearer))
    assert_unavailable(client.post("/chat", headers=bearer, json={"message": "hi"}))
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert_unavailable(client.get("/admin/usage.json", headers=admin))
    assert_unavailable(client.post("/v1/chat/completions", headers=bearer, json={
        "model": "echo", "messages": [{"role": "user", "content": "hi"}]}))
    anthropic = client.post("/v1/messages", headers={"x-api-key": key}, json={
        "model": "echo", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert anthropic.status_code == 503 and int(anthropic.headers["Retry-After"]) >= 1
    assert anthropic.get_json()["type"] == "error"     # Anthropic's shape has no code field
    assert client.get("/healthz").status_code == 503


# --- item 7 / 11: a key whose plan left the policy; the key's plan in the local fallback ----------

def test_a_removed_plan_falls_back_to_the_default_plan(tmp_path: Path, r: redis.Redis,
                                                       redis_url: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    key = new_key(make_app(tmp_path / "before", redis_url), "gold-user", "pro")
    app = make_app(tmp_path / "after", redis_url, WITHOUT_PRO)
    client = app.test_client()
    with caplog.at_level(logging.WARNING, logger="limiter.policy"):
        usage = client.get("/v1/usage", headers={"Authorization": f"Bearer {key}"})
        resp = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"model": "echo",
                                 "messages": [{"role": "user", "content": "hi"}]})
        again = client.post("/v1/messages", headers={"x-api-key": key}, json={
            "model": "echo", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert usage.status_code == 200 and usage.get_json()["plan"] == "starter"
    assert resp.status_code == 200, resp.get_data()[:300]
    assert again.status_code == 200, again.get_data()[:300]
    removed = [rec for rec in caplog.records if "'pro'" in rec.getMessage()]
    assert len(removed) == 1, [rec.getMessage() for rec in caplog.records]


def test_local_fallback_keeps_the_keys_plan(tmp_path: Path) -> None:
    # Two workers: each holds half of pro's burst of 20 (10) while the store is away;
    # starter (the user's plan by [users]/default) would hold 1.
    app = make_app(tmp_path, away_url(), WEB_CONCURRENCY="2")
    with app.test_request_context("/chat", method="POST"):
        limiter = current_limiter()
        decisions = [limiter.engine.acquire("key-user", None, limiter.policy.plans["pro"])
                     for _ in range(11)]
    assert all(d.degraded for d in decisions)
    assert [d.allowed for d in decisions] == [True] * 10 + [False]


# --- item 11: operators see the key's plan --------------------------------------------------------

def test_limits_show_and_reset_use_the_keys_plan(app: Flask) -> None:
    new_key(app, "keyed-pro", "pro")
    runner = app.test_cli_runner()
    shown = runner.invoke(args=["limits", "show", "keyed-pro"])
    assert shown.exit_code == 0, shown.output
    assert "plan pro" in shown.output and "tokens-minute" in shown.output
    reset = runner.invoke(args=["limits", "reset", "keyed-pro", "--layer", "tokens-minute"])
    assert reset.exit_code == 0, reset.output
    # A user without a key is still on [users]/default.
    assert "plan starter" in runner.invoke(args=["limits", "show", "nobody"]).output


def test_admin_usage_uses_the_keys_plan(app: Flask, client: FlaskClient) -> None:
    new_key(app, "keyed-pro", "pro")
    body = client.get("/admin/usage.json", headers={"Authorization": f"Bearer {ADMIN}"}).get_json()
    row = next(u for u in body["users"] if u["user"] == "keyed-pro")
    assert row["plan"] == "pro"
    assert "tokens-minute" in {layer["layer"] for layer in row["layers"]}


# --- item 10: admin and metrics credentials -------------------------------------------------------

def admin_get(client: FlaskClient, token: str, ip: str = "192.0.2.1") -> object:
    return client.get("/admin/usage.json", headers={"Authorization": f"Bearer {token}"},
                      environ_overrides={"REMOTE_ADDR": ip})


def test_failed_admin_auth_is_limited_per_ip(client: FlaskClient) -> None:
    # The right token is never counted.
    assert [admin_get(client, ADMIN).status_code for _ in range(15)] == [200] * 15
    wrong = [admin_get(client, "x" * 40) for _ in range(11)]
    assert [w.status_code for w in wrong] == [401] * 10 + [429]
    assert int(wrong[-1].headers["Retry-After"]) >= 1
    assert wrong[-1].get_json()["code"] == "rate_limited"
    # Once refused, the right token waits too (a 200 would tell a guesser it had won)...
    assert admin_get(client, ADMIN).status_code == 429
    assert client.get("/admin/usage", headers={"Authorization": f"Bearer {ADMIN}"},
                      environ_overrides={"REMOTE_ADDR": "192.0.2.1"}).status_code == 429
    # ...while another address is not affected.
    assert admin_get(client, ADMIN, "192.0.2.2").status_code == 200


def test_a_short_admin_token_refuses_to_start(tmp_path: Path, redis_url: str) -> None:
    with pytest.raises(RuntimeError, match="ADMIN_TOKEN must be at least 32 characters"):
        make_app(tmp_path, redis_url, ADMIN_TOKEN="admin-secret")


def test_gunicorn_does_not_boot_with_a_short_admin_token(gunicorn, tmp_path: Path,
                                                          unix_url: str) -> None:
    with pytest.raises(RuntimeError, match="exited"):
        gunicorn(REDIS_URL=unix_url, LIMITS_CONFIG=write_policy(tmp_path, POLICY),
                 ADMIN_TOKEN="short", WEB_CONCURRENCY="1")
    logs = "".join(p.read_text() for p in tmp_path.glob("gunicorn-*.log"))
    assert "ADMIN_TOKEN must be at least 32 characters" in logs


def test_metrics_token(tmp_path: Path, r: redis.Redis, redis_url: str) -> None:
    token = "metrics-" + "m" * 30
    client = make_app(tmp_path, redis_url, METRICS_TOKEN=token).test_client()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"}):
        resp = client.get("/metrics", headers=headers)
        assert resp.status_code == 401 and resp.get_json()["code"] == "unauthorized"
        assert resp.headers["WWW-Authenticate"].lower().startswith("bearer")
    ok = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200 and b"# HELP" in ok.get_data()


def test_metrics_need_the_admin_token_when_it_is_set(client: FlaskClient) -> None:
    """This app sets ADMIN_TOKEN and no METRICS_TOKEN: /metrics shows spend per plan and model,
    so it is the operator's (issue 19; the loopback rule without any token:
    tests/test_client_choices.py)."""
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).status_code \
        == 200


# --- item 9 and 7: slow and oversized bodies, under gunicorn --------------------------------------

CHAT = b'{"message": "hi", "user_id": "body-user"}'


def raw_request(port: int, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head)
    return sock


def read_response(sock: socket.socket) -> bytes:
    data = b""
    while True:
        part = sock.recv(65536)
        if not part:
            return data
        data += part


@pytest.fixture
def served(gunicorn, tmp_path: Path, r: redis.Redis, unix_url: str):
    return gunicorn(REDIS_URL=unix_url, LIMITS_CONFIG=write_policy(tmp_path, POLICY),
                    BODY_TIMEOUT="2", WEB_CONCURRENCY="1")


def test_a_trickled_body_is_cut_at_the_deadline(served) -> None:
    # 60 bytes at one every 0.25 s would take 15 s; the 2 s deadline ends it long before.
    body = b'{"message": "' + b"x" * 30 + b'", "user_id": "slow"}'
    body = body.ljust(60)
    sock = raw_request(served.port, b"POST /chat HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(body))
    sent = 0
    while sent < len(body):
        readable, _, _ = select.select([sock], [], [], 0.25)
        if readable:
            break
        try:
            sock.sendall(body[sent:sent + 1])
        except OSError:
            break
        sent += 1
    response = read_response(sock)
    sock.close()
    assert sent < len(body)
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), response[:300]
    assert b"connection: close" in head.lower()
    assert b'"request_timeout"' in payload


def chunked(data: bytes, size: int = 65536) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size])
                   for i in range(0, len(data), size))
    return out + b"0\r\n\r\n"


def test_a_chunked_body_over_the_limit_is_413(served) -> None:
    # Today werkzeug cuts a chunked body off mid-read and /chat answers 400. The server now
    # reads (and drops) the rest, so the client gets its 413 rather than a reset connection.
    sock = raw_request(served.port, b"POST /chat HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                       b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    sock.sendall(chunked(b'{"message": "' + b"x" * (2 * 1024 * 1024) + b'"}'))
    response = read_response(sock)
    sock.close()
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), response[:300]
    assert b'"payload_too_large"' in payload


def test_normal_bodies_still_work(served) -> None:
    import httpx

    plain = httpx.post(served.url + "/chat", content=CHAT,
                       headers={"Content-Type": "application/json"})
    assert plain.status_code == 200, plain.text
    sock = raw_request(served.port, b"POST /chat HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                       b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                       + chunked(CHAT, 7))
    response = read_response(sock)
    sock.close()
    assert response.startswith(b"HTTP/1.1 200"), response[:300]
    assert b'"reply"' in response


def test_a_server_that_does_not_end_the_stream_is_read_to_content_length_only() -> None:
    """werkzeug's dev server hands the raw socket file: reading past Content-Length would
    wait for the next request. Only the declared bytes are taken."""
    import io

    from limiting.web.body import BodyDeadline

    seen: list[bytes] = []

    def app(environ: dict, start_response: object) -> list[bytes]:
        seen.append(environ["wsgi.input"].read())
        return []

    stream = io.BytesIO(b'{"a": 1}GET /next HTTP/1.1\r\n')
    BodyDeadline(app)({"CONTENT_LENGTH": "8", "wsgi.input": stream}, lambda *a: None)
    assert seen == [b'{"a": 1}'] and stream.read() == b"GET /next HTTP/1.1\r\n"
