"""The upstream guard holds a model only on signals about the limit every caller shares.

The real openai and anthropic SDKs call the app in-process (httpx's WSGI transport); the app
calls the local fake provider over HTTP. A request too large for the provider by itself gets
its own 400 and holds nobody; a shared-limit 429/529 holds, capped; ``remaining = 0`` is
heeded by the very next call; header garbage never answers 500.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

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
from limiting.core.upstream import pacing_args, refused_alone
from limiting.providers import clients
from tests.conftest import write_policy
from tests.policies import LOADED, plan, policy, served_by

POLICY = policy(
    store=LOADED, per_ip="100000 per 10 seconds", default="p",
    plans={"p": plan(100, 10, "10000 per day", tokens_per_minute=1000000, default_max_tokens=20),
           "single": plan(100, 10, max_concurrent=1, lease_ttl_seconds=30)},
    models={"gpt-4o-mini": served_by("openai"),
            "gpt-capped": served_by("openai", max_hold_seconds=5),
            "gpt-small": served_by("openai", tokens_per_minute=100),
            "claude-3-5-haiku-latest": served_by("anthropic"),
            "claude-small": served_by("anthropic", tokens_per_minute=100)})
HELLO = [{"role": "user", "content": "hello big world"}]
BIG = [{"role": "user", "content": "word " * 400}]     # 400 tokens at the fake
GPT, CLAUDE = "gpt-4o-mini", "claude-3-5-haiku-latest"


class Client:
    """One user's SDK clients, calling the app through WSGI."""

    def __init__(self, app: Flask, key: str) -> None:
        self.http = httpx.Client(transport=httpx.WSGITransport(app=app))
        self.oai = openai.OpenAI(base_url="http://app/v1", api_key=key, max_retries=0,
                                 http_client=self.http)
        # The anthropic SDK brings its own fork of httpx.
        self.ant = anthropic.Anthropic(base_url="http://app", api_key=key, max_retries=0,
                                       http_client=httpx2.Client(
                                           transport=httpx2.WSGITransport(app=app)))

    def call(self, model: str, max_tokens: int = 10,
             messages: list[dict[str, str]] = HELLO) -> httpx.Response:
        """One plain call in the provider's own dialect; the raw response, errors included."""
        body = {"model": model, "max_tokens": max_tokens, "messages": messages}
        if model.startswith("claude"):
            return self.http.post("http://app/v1/messages", headers={"x-api-key": self.key},
                                  json=body)
        return self.http.post("http://app/v1/chat/completions",
                              headers={"Authorization": f"Bearer {self.key}"}, json=body)

    @property
    def key(self) -> str:
        return str(self.oai.api_key)


def _start_app(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch,
               base: str) -> tuple[Flask, dict[str, Client]]:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fake")
    monkeypatch.setenv("OPENAI_BASE_URL", base + "/v1")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-fake")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", base)
    monkeypatch.setenv("UPSTREAM_TIMEOUT", "5")
    clients.reset()
    app = create_app({"REDIS_URL": redis_url, "REQUIRE_API_KEY": "1",
                      "LIMITS_CONFIG": write_policy(tmp_path, POLICY)})
    keys = app.extensions["llm_limiter"].keys
    users = {name: Client(app, keys.create(name, plan)[0])
             for name, plan in (("alice", "p"), ("bob", "p"), ("solo", "single"))}
    return app, users


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProvider]:
    with FakeProvider() as fp:
        yield fp
    clients.reset()


def _quiet(app: Flask) -> None:
    """Write what the app's pacing writer still holds now, not into the next test's store."""
    observer = app.extensions["llm_limiter"]._observer
    if observer is not None:
        observer.flush()


@pytest.fixture
def users(tmp_path: Path, r: redis.Redis, redis_url: str, fake: FakeProvider,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Client]]:
    app, users = _start_app(tmp_path, redis_url, monkeypatch, fake.url)
    yield users
    _quiet(app)


# --- a request too large for the provider holds nobody -------------------------------------------

@pytest.mark.parametrize("model", [GPT, CLAUDE])
def test_a_request_too_large_for_the_provider_holds_nobody(
        users: dict[str, Client], fake: FakeProvider, model: str) -> None:
    fake.set_limits(tpm=200)        # the provider's own limit; ours do not know it
    big = users["alice"].call(model, messages=BIG)
    assert big.status_code == 400, big.text
    error = big.json()["error"]
    assert error["type"] == "invalid_request_error"
    if model == GPT:
        assert error["code"] == "request_too_large_for_upstream"
    assert "Retry-After" not in big.headers
    # Another user's call right after goes through: nothing holds the model.
    before = len(fake.requests)
    small = users["bob"].call(model, max_tokens=10)
    assert small.status_code == 200, small.text
    assert len(fake.requests) == before + 1


def test_the_sdk_sees_a_bad_request_not_a_rate_limit(users: dict[str, Client],
                                                     fake: FakeProvider) -> None:
    fake.set_limits(tpm=200)
    with pytest.raises(openai.BadRequestError) as caught:
        users["alice"].oai.chat.completions.create(model=GPT, messages=BIG, max_tokens=5)
    assert caught.value.code == "request_too_large_for_upstream"
    with pytest.raises(anthropic.BadRequestError):
        users["alice"].ant.messages.create(model=CLAUDE, messages=BIG, max_tokens=5)
    assert users["bob"].oai.chat.completions.create(model=GPT, messages=HELLO, max_tokens=5)


def test_what_counts_as_this_request_alone() -> None:
    openai_big = {"message": "Request too large for gpt-4o in organization org-x on tokens per "
                  "min (TPM): Limit 30000, Requested 50000.", "type": "tokens",
                  "code": "rate_limit_exceeded"}
    shared = {"message": "Rate limit reached for gpt-4o in organization org-x on tokens per "
              "min (TPM): Limit 30000, Used 29000, Requested 2000.", "type": "tokens"}
    assert refused_alone(429, {}, openai_big, 0)
    assert not refused_alone(429, {}, shared, 0)
    assert refused_alone(429, {}, {"message": "... Limit 100, Used 0, Requested 500."}, 0)
    assert refused_alone(413, {}, None, 0)
    anthropic_413 = {"type": "error", "error": {"type": "request_too_large", "message": "x"}}
    assert refused_alone(400, {}, anthropic_413, 0)
    announced = {"anthropic-ratelimit-tokens-limit": "1000"}
    assert refused_alone(429, announced, {"type": "rate_limit_error"}, 5000)
    assert not refused_alone(429, announced, {"type": "rate_limit_error"}, 500)
    assert not refused_alone(529, announced, None, 5000)


# --- holds on the shared limit, capped -----------------------------------------------------------

@pytest.mark.parametrize(("model", "cap"), [(GPT, 60), ("gpt-capped", 5), (CLAUDE, 60)])
def test_a_shared_limit_429_holds_the_model_capped(users: dict[str, Client], fake: FakeProvider,
                                                    model: str, cap: int) -> None:
    fake.fail_next(429, retry_after=3600)
    first = users["alice"].call(model)
    assert first.status_code in (429, 503)
    before = len(fake.requests)
    second = users["bob"].call(model)
    assert second.status_code == 429, second.text
    assert cap - 5 <= int(second.headers["Retry-After"]) <= cap
    assert len(fake.requests) == before          # the hold kept it from the provider


def test_a_529_holds_the_model(users: dict[str, Client], fake: FakeProvider) -> None:
    fake.fail_next(529, retry_after=7)
    assert users["alice"].call(CLAUDE).status_code == 503
    before = len(fake.requests)
    held = users["bob"].call(CLAUDE)
    assert held.status_code == 429 and held.json()["error"]["type"] == "rate_limit_error"
    assert 3 <= int(held.headers["Retry-After"]) <= 7
    assert len(fake.requests) == before


# --- remaining = 0 heeded at once ----------------------------------------------------------------

@pytest.mark.parametrize("announce", [{"remaining_requests": 0, "reset_requests": 30},
                                      {"remaining_tokens": 0, "reset_tokens": 30}])
@pytest.mark.parametrize("model", [GPT, CLAUDE])
def test_remaining_zero_is_heeded_by_the_very_next_call(
        users: dict[str, Client], fake: FakeProvider, model: str,
        announce: dict[str, int]) -> None:
    fake.set_ratelimit_headers(**announce)
    assert users["alice"].call(model).status_code == 200
    before = len(fake.requests)
    nxt = users["bob"].call(model)
    assert nxt.status_code == 429, nxt.text
    assert "upstream" in nxt.text and 20 <= int(nxt.headers["Retry-After"]) <= 31
    assert len(fake.requests) == before


# --- header garbage ---------------------------------------------------------------------------

GARBAGE = ["inf", "-inf", "nan", "1e400", "1e20", "-5", "garbage", "", "0x10", "1" * 400]


class _Garbage(BaseHTTPRequestHandler):
    """An upstream whose every rate-limit header says ``value`` (as a broken proxy might)."""

    value = "inf"
    status = 200

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        anthropic_shape = self.path.endswith("/messages")
        if self.status != 200:
            body: dict[str, object] = {"error": {"message": "slow down", "type": "requests"}}
        elif anthropic_shape:
            body = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                    "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
                    "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 1}}
        else:
            body = {"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "hi"}}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
        data = json.dumps(body).encode()
        self.send_response(self.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for kind in ("requests", "tokens"):
            for part in ("limit", "remaining", "reset"):
                self.send_header(f"x-ratelimit-{part}-{kind}", self.value)
        for kind in ("requests", "tokens", "input-tokens", "output-tokens"):
            for part in ("limit", "remaining", "reset"):
                self.send_header(f"anthropic-ratelimit-{kind}-{part}", self.value)
        self.send_header("retry-after", self.value)
        self.send_header("retry-after-ms", self.value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def garbage(tmp_path: Path, r: redis.Redis, redis_url: str,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[type[_Garbage], dict[str, Client]]]:
    handler = type("Handler", (_Garbage,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    app, users = _start_app(tmp_path, redis_url, monkeypatch,
                            f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield handler, users
    finally:
        _quiet(app)
        server.shutdown()
        server.server_close()
        clients.reset()


@pytest.mark.parametrize("value", GARBAGE)
@pytest.mark.parametrize("status", [200, 429])
def test_provider_header_garbage_never_answers_500(
        garbage: tuple[type[_Garbage], dict[str, Client]], value: str, status: int) -> None:
    handler, users = garbage
    handler.value, handler.status = value, status
    for model in (GPT, CLAUDE):
        for _ in range(2):
            resp = users["alice"].call(model)
            assert resp.status_code < 500 or resp.status_code == 503, resp.text
            assert resp.status_code != 500
    if status == 429:
        # Garbage retry-after: the hold is the 1 s default, not forever and not a crash.
        resp = users["bob"].call(GPT)
        assert resp.status_code in (429, 503) and int(resp.headers["Retry-After"]) <= 60


@pytest.mark.parametrize("value", GARBAGE)
def test_pacing_args_bound_every_number(value: str) -> None:
    names = ["x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
             "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens", "retry-after",
             "retry-after-ms", "anthropic-ratelimit-tokens-remaining",
             "anthropic-ratelimit-tokens-reset"]
    for status in (200, 429, 529):
        args = pacing_args(dict.fromkeys(names, value), status)
        assert args is None or all(-1 <= a <= 2**53 for a in args)
        if args is not None:
            assert args[1] <= 86_400_000_000 and args[3] <= 86_400_000_000
            assert args[4] <= 60_000_000


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400", "-5", "garbage", ""])
def test_observe_lua_treats_bad_numbers_as_unknown(r: redis.Redis, redis_url: str,
                                                   value: str) -> None:
    from limiting.stores.storage import open_store

    store = open_store(redis_url, timeout=2.0)
    store.run("observe", ["{m:x}pace"], [value] * 5)
    stored = {k.decode(): v.decode() for k, v in r.hgetall("{m:x}pace").items()}
    for field, text in stored.items():
        number = float(text)
        assert number == number and 0 <= number < 2**60, (field, text)
    store.run("observe", ["{m:x}pace"], ["1e20", "1e20", "3", "1e20", "1e20"])
    stored = {k.decode(): float(v) for k, v in r.hgetall("{m:x}pace").items()}
    now_us = (r.time()[0] + 1) * 1_000_000
    assert stored["rl"] == 2**53 and stored["rr"] <= now_us + 86_400_000_001
    assert stored["until"] <= now_us + 86_400_000_001


# --- refusals that say how long, honestly --------------------------------------------------------

@pytest.mark.parametrize("model", ["gpt-small", "claude-small"])
def test_a_request_that_never_fits_the_guard_is_a_400(users: dict[str, Client],
                                                      fake: FakeProvider, model: str) -> None:
    resp = users["alice"].call(model, max_tokens=500)    # the guard allows 100 per minute
    assert resp.status_code == 400, resp.text
    assert "Retry-After" not in resp.headers
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and "never" in error["message"]
    if model == "gpt-small":
        assert error["code"] == "exceeds_limit"
    assert fake.requests == []
    # Nothing was charged: a small request of the same user passes.
    assert users["alice"].call(model, max_tokens=5).status_code == 200


def test_a_chat_request_that_never_fits_the_guard_is_a_400(users: dict[str, Client],
                                                           fake: FakeProvider) -> None:
    http = users["alice"].http
    resp = http.post("http://app/chat", headers={"Authorization": f"Bearer {users['alice'].key}"},
                     json={"message": "hello " * 200, "model": "gpt-small"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["code"] == "exceeds_limit"
    assert resp.json()["layer"] == "upstream:gpt-small"
    assert fake.requests == []


def test_a_concurrency_refusal_waits_for_the_soonest_lease(tmp_path: Path, r: redis.Redis,
                                                           redis_url: str,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           fake: FakeProvider) -> None:
    app, users = _start_app(tmp_path, redis_url, monkeypatch, fake.url)
    limiter = app.extensions["llm_limiter"]
    plan = limiter.policy.plans["single"]
    held = limiter.engine.reserve("solo", plan, Ask("echo", None, 5, 5))
    # one request in flight, its lease 30 s
    resp = users["solo"].call("echo")
    assert resp.status_code == 429, resp.text
    assert 25 <= int(resp.headers["Retry-After"]) <= 30
    assert "as soon as one of your requests in flight finishes" in resp.json()["error"]["message"]
    held.cancel()
    assert users["solo"].call("echo").status_code == 200
    _quiet(app)
