"""The deny cache: a client hammering over its limit is refused by its worker without a store
call, honestly (Retry-After, headers, body as the store's), never longer than the store said,
and let through again at once by `limits reset` and overrides; refusal logs are aggregated."""

from __future__ import annotations

import logging
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from limiting.core.decision import Decision, LayerState
from limiting.core.layers import bucket, edge
from limiting.deny import ENTRY_BYTES, MAX_STALE, PROBE_SECONDS, DenyCache
from limiting.web import logs
from tests.conftest import store_calls, write_policy
from tests.policies import HELD, LOADED, plan, policy

# A burst of two that refills a token per 100 s (0.01 a second): no test here lasts that long,
# so how many of a run of requests pass does not depend on how quickly they were sent.
HAMMER = policy(store=LOADED, per_ip="100000 per minute",
                plans={"starter": plan(2, 0.01, "1000 per day"),
                       "pro": plan(100, 100, "1000 per day")})
# One request a second after a burst of two: a refusal waits up to a second.
PATIENT = HAMMER.replace("refill_per_second = 0.01", "refill_per_second = 1")
# A long wait: the store says ~100 s, the cache answers a second at a time at most.
SLOW = HELD
# The edge holds an address to 3 requests a minute; users are roomy.
EDGE = policy(store=LOADED, per_ip="3 per minute",
              plans={"starter": plan(1000, 1000, "100000 per day")})


def evalsha_calls(r: redis.Redis) -> int:
    return store_calls(r, "evalsha")


def probes(began: float) -> int:
    """How many requests a worker's cache may have let through to ask the store since
    ``began`` (monotonic, before the refusal it learnt): none in an entry's first
    MAX_STALE - PROBE_SECONDS, then one per that long at most (each refusal renews the entry).
    0 when the test's requests are over quickly; more only as a loaded machine's time allows."""
    return int((time.monotonic() - began) // (MAX_STALE - PROBE_SECONDS))


def _app(url: str, tmp_path: Path, text: str, **config: Any) -> Flask:
    return create_app({"REDIS_URL": url, "LIMITS_CONFIG": write_policy(tmp_path, text),
                       "TESTING": True, **config})


def chat(client: FlaskClient, user: str, ip: str = "10.0.0.1") -> Any:
    return client.post("/chat", json={"message": "hi", "user_id": user},
                       environ_base={"REMOTE_ADDR": ip})


@pytest.fixture
def hammered(r: redis.Redis, redis_url: str, tmp_path: Path) -> Flask:
    return _app(redis_url, tmp_path, HAMMER)


def test_a_hammering_user_is_refused_without_store_calls_and_honestly(
        hammered: Flask, r: redis.Redis) -> None:
    client = hammered.test_client()
    assert [chat(client, "mallory").status_code for _ in range(2)] == [200, 200]
    began = time.monotonic()
    first = chat(client, "mallory")   # the store's refusal
    assert first.status_code == 429
    before = evalsha_calls(r)
    cached = [chat(client, "mallory") for _ in range(50)]
    assert evalsha_calls(r) - before <= probes(began), \
        "refusals from the cache must not call the store"
    assert {c.status_code for c in cached} == {429}
    store_wait = int(first.headers["Retry-After"])
    for resp in cached:
        # The same answer as the store's: body, Retry-After never longer, every header.
        body, want = resp.get_json(), first.get_json()
        assert body["code"] == want["code"] == "rate_limited"
        assert body["layer"] == want["layer"] == "user"
        assert 1 <= int(resp.headers["Retry-After"]) <= store_wait
        assert body["retry_after"] == int(resp.headers["Retry-After"])
        assert resp.headers["RateLimit-Policy"] == first.headers["RateLimit-Policy"]
        assert resp.headers["RateLimit"].startswith('"edge";r=')
        assert '"user";r=0;t=' in resp.headers["RateLimit"]
        assert resp.headers["X-RateLimit-Remaining"] == "0"
        assert resp.headers["X-RateLimit-Reset"] == resp.headers["Retry-After"]
        assert resp.headers["X-Request-ID"]
    # Another user, and the same user's other namespace (an API key's), are not held.
    assert chat(client, "trent").status_code == 200
    key, _ = hammered.extensions["llm_limiter"].keys.create("mallory")
    resp = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200, resp.get_data(as_text=True)


def test_a_client_that_waits_retry_after_gets_through(r: redis.Redis, redis_url: str,
                                                      tmp_path: Path) -> None:
    client = _app(redis_url, tmp_path, PATIENT).test_client()
    for _ in range(3):
        began = time.monotonic()
        codes = [chat(client, "patient").status_code for _ in range(5)]
        # At most the burst of two, and a token more per second the five took.
        assert codes.count(200) <= 2 + int(time.monotonic() - began)
        # Refused now (a loaded machine may have earned a token meanwhile: then ask again).
        for _ in range(10):
            refused = chat(client, "patient")
            if refused.status_code == 429:
                break
        assert refused.status_code == 429
        time.sleep(int(refused.headers["Retry-After"]))
        resp = chat(client, "patient")
        assert resp.status_code == 200, resp.get_json()


def test_the_cache_never_refuses_past_the_stores_wait(r: redis.Redis, redis_url: str,
                                                      tmp_path: Path) -> None:
    # 4 requests a second: every wait is at most a quarter second.
    app = _app(redis_url, tmp_path, policy(store=LOADED, per_ip="100000 per minute",
                                           plans={"starter": plan(1, 4, "10000 per day")}))
    client = app.test_client()
    deadline = time.monotonic() + 3
    admitted, last_admitted = 0, 0.0
    while time.monotonic() < deadline:
        sent = time.monotonic()
        resp = chat(client, "steady")
        if resp.status_code == 200:
            admitted += 1
            last_admitted = time.monotonic()   # the store admitted it before this
        else:
            assert resp.headers["Retry-After"] == "1"
            # The store admits a request a quarter second after the last one it admitted: one
            # sent that long after the last admission's reply was back was refused by a cache
            # holding the user past the store's wait. (Timed by the test's clock around the
            # calls, so however slow the machine, no honest refusal fails this.)
            assert sent - last_admitted < 0.25, "held past the store's wait"
    assert admitted >= 2    # the loop ran past a wait at least once


def test_a_long_wait_is_cached_a_second_at_a_time(r: redis.Redis, redis_url: str,
                                                  tmp_path: Path) -> None:
    app = _app(redis_url, tmp_path, SLOW)
    client = app.test_client()
    assert chat(client, "stuck").status_code == 200
    began = time.monotonic()
    first = chat(client, "stuck")
    answered = time.monotonic()
    assert first.status_code == 429 and int(first.headers["Retry-After"]) > 90
    before = evalsha_calls(r)
    # Until 1.6 s after the refusal, and at least one request sent past the entry's second
    # (on a loaded machine one request can take longer than the whole loop should).
    sent = answered
    while sent - answered < 1.6:
        sent = time.monotonic()
        resp = chat(client, "stuck")
        assert resp.status_code == 429
        assert int(resp.headers["Retry-After"]) <= int(first.headers["Retry-After"])
    # Asked again once its entry was a second old: one or two calls on a quick machine (one
    # more per MAX_STALE - PROBE_SECONDS the loop took longer), not one per request.
    assert 1 <= evalsha_calls(r) - before <= 1 + probes(began)


def test_limits_reset_and_overrides_let_the_user_through_at_once(
        r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    app = _app(redis_url, tmp_path, SLOW)
    client, cli = app.test_client(), app.test_cli_runner()
    assert [chat(client, "oscar").status_code for _ in range(3)] == [200, 429, 429]
    assert cli.invoke(args=["limits", "reset", "oscar"]).exit_code == 0
    assert chat(client, "oscar").status_code == 200
    assert chat(client, "oscar").status_code == 429
    assert cli.invoke(args=["limits", "set", "oscar", "--plan", "pro"]).exit_code == 0
    time.sleep(0.05)   # the bucket's one key, now refilled at pro's 100 a second
    assert chat(client, "oscar").status_code == 200
    assert cli.invoke(args=["limits", "unset", "oscar"]).exit_code == 0
    # Back on starter: its bucket holds one (pro refilled it), then the store refuses again.
    assert [chat(client, "oscar").status_code for _ in range(3)] == [200, 429, 429]


def test_an_ip_rotating_user_ids_is_held_by_the_cached_edge(
        r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    app = _app(redis_url, tmp_path, EDGE)
    client = app.test_client()
    assert [chat(client, f"bot-{i}", "10.9.9.9").status_code for i in range(3)] == [200] * 3
    began = time.monotonic()
    refused = chat(client, "bot-3", "10.9.9.9")
    assert refused.status_code == 429 and refused.get_json()["layer"] == "edge"
    before = evalsha_calls(r)
    for i in range(4, 40):
        resp = chat(client, f"bot-{i}", "10.9.9.9")
        assert resp.status_code == 429 and resp.get_json()["layer"] == "edge"
        assert int(resp.headers["Retry-After"]) <= int(refused.headers["Retry-After"])
    assert evalsha_calls(r) - before <= probes(began)     # 0 on a quick machine
    assert chat(client, "bot-99", "10.9.9.10").status_code == 200   # another address


def test_no_wait_and_fail_policy_refusals_are_not_cached(r: redis.Redis, redis_url: str,
                                                         tmp_path: Path) -> None:
    app = _app(redis_url, tmp_path, HAMMER)
    deny = app.extensions["llm_limiter"].deny
    layers = (edge(60, 10, "fail_open"), bucket("user", "b", 1, 1, "fail_open"))
    plan_ = app.extensions["llm_limiter"].policy.plans["starter"]
    never = Decision(False, (LayerState(layers[1], 0, 1.0),), LayerState(layers[1], 0, 1.0),
                     None)
    away = Decision(False, (), wait=1.0, unavailable=True)
    for decision in (never, away):
        deny.learn(decision, deny.clock(), "1.2.3.4", "u1", "b", plan_, layers, 1)
    assert len(deny) == 0


def test_the_cache_is_bounded_and_its_entries_are_small() -> None:
    deny = DenyCache(max_entries=1000)
    layers = (edge(60, 10, "fail_open"), bucket("user", "b", 1, 1, "fail_open"))
    from limiting.core.policy import Plan
    some_plan = Plan("p", burst=1, refill_per_second=1)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(5000):
        refused = LayerState(layers[1], 0, 30.0)
        decision = Decision(False, (LayerState(layers[0], 5, 10.0), refused), refused, 30.0,
                            '"edge";q=10;w=60, "user";q=1;w=1')
        deny.learn(decision, deny.clock(), None, f"user-{i}", "b", some_plan, layers, 1)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert len(deny) == 1000   # the oldest went first
    assert deny.refusal(None, "user-4999", "b", some_plan) is not None
    assert deny.refusal(None, "user-0", "b", some_plan) is None
    assert used / 1000 <= ENTRY_BYTES, used / 1000


def test_refusal_logs_carry_counts(hammered: Flask) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("limiter")
    logger.addHandler(handler)
    logs.refusals.flush()
    try:
        client = hammered.test_client()
        for _ in range(32):
            chat(client, "noisy")
        lines = [getattr(rec, "event", {}) for rec in records]
        mine = [e for e in lines if e.get("user") == "noisy"]
        assert len(mine) == 1 and mine[0]["count"] == 1 and mine[0]["request_id"]
        logs.refusals.flush()   # as the interval's end does
        mine = [getattr(rec, "event", {}) for rec in records]
        mine = [e for e in mine if e.get("user") == "noisy"]
        # One line at once, then the count (more lines only if an interval ended between).
        assert mine[0]["count"] == 1 and sum(e["count"] for e in mine[1:]) == 29
        assert mine[-1]["layer"] == "user" and mine[-1]["interval_s"] == logs.AGGREGATE_SECONDS
        assert len(mine) <= 3
    finally:
        logger.removeHandler(handler)


# --- four gunicorn workers ---------------------------------------------------------------------


@pytest.fixture
def four_workers(gunicorn: Callable[..., Any], tmp_path: Path, r: redis.Redis,
                 unix_url: str) -> Iterator[Any]:
    yield gunicorn(REDIS_URL=unix_url, LIMITS_CONFIG=write_policy(tmp_path, SLOW),
                   WEB_CONCURRENCY="4", LIMITER_INSTANCE=str(tmp_path))


def test_every_worker_refuses_from_its_cache_and_lets_through_after_reset(
        four_workers: Any, tmp_path: Path, unix_url: str, r: redis.Redis) -> None:
    url = four_workers.url
    cli = _app(unix_url, tmp_path, SLOW).test_cli_runner()

    mine = threading.local()

    def post(_: int) -> tuple[int, int, float]:
        """(status, Retry-After, when the answer was back)."""
        client = getattr(mine, "client", None)
        if client is None:   # a client per thread: one shared by threads races on close
            client = mine.client = httpx.Client(timeout=30)
        resp = client.post(url + "/chat", json={"message": "hi", "user_id": "flood"})
        return resp.status_code, int(resp.headers.get("Retry-After", "0")), time.monotonic()

    with ThreadPoolExecutor(16) as pool:
        sent = time.monotonic()
        first = list(pool.map(post, range(64)))
        assert sum(code == 200 for code, _, _ in first) == 1   # burst 1: the store's answer
        before, began = evalsha_calls(r), time.monotonic()
        refused = list(pool.map(post, range(1000)))
        calls = evalsha_calls(r) - before
        # The one admitted went in after `sent`, so its next token is due 100 s after that:
        # every refusal says so, whether the store or a worker's cache gave it (less only by
        # the time gone since, which a loaded box stretches; a second for rounding).
        assert all(code == 429 and wait >= 99 - (back - sent) for code, wait, back in refused)
        # Each worker asks the store again at most about once a second; not once a refusal.
        # (A worker that had not learnt the refusal yet asks for each of its requests in
        # flight, 16 at most.) On a quick machine, 5% of the refusals; past that only as the
        # time the 1000 took allows. On a loaded one a probe may take longer than
        # PROBE_SECONDS: its entry then goes stale (MAX_STALE wins over saving calls) and that
        # worker's requests in flight ask too, until a refusal renews it: 16 more a round at
        # most. (A quick machine makes 4 or 5 calls in all.)
        allowed = max(0.05 * len(refused), (4 + 16) * (1 + probes(began)) + 16)
        assert calls <= allowed, (calls, allowed)
        assert cli.invoke(args=["limits", "reset", "flood", "--anonymous"]).exit_code == 0
        started = time.monotonic()
        while True:   # every worker: within about a second
            asked = time.monotonic()
            if post(0)[0] == 200:
                break
            # Refused: then it was sent within about a second of the reset. (Its send, not
            # its reply: a loaded machine may take long to answer, honestly.)
            assert asked - started < 1.75, "reset not seen within a second"


def _refusal(wait: float) -> tuple[Decision, tuple[Any, ...]]:
    layers = (edge(60, 10, "fail_open"), bucket("user", "b", 1, 1, "fail_open"))
    refused = LayerState(layers[1], 0, wait)
    return Decision(False, (LayerState(layers[0], 5, 10.0), refused), refused, wait), layers


def test_an_entry_never_outlives_the_stores_wait_nor_a_second() -> None:
    from limiting.core.policy import Plan
    some_plan = Plan("p", burst=1, refill_per_second=1)
    now = [100.0]
    deny = DenyCache(clock=lambda: now[0])
    decision, layers = _refusal(0.5)
    now[0] = 100.01   # the reply came 10 ms after the call was sent
    deny.learn(decision, 100.0, "1.1.1.1", "u1", "b", some_plan, layers, 1)
    now[0] = 100.3
    aged = deny.refusal("1.1.1.1", "u1", "b", some_plan)
    assert aged is not None and aged.retry_after == 1
    assert aged.wait is not None and abs(aged.wait - 0.21) < 1e-9   # from the reply: honest
    assert deny.refusal("1.1.1.1", "u1", "b", some_plan, patience=0.3) is None   # may wait
    now[0] = 100.5   # the store's wait, from the send: the store may admit now
    assert deny.refusal("1.1.1.1", "u1", "b", some_plan) is None

    decision, layers = _refusal(30.0)
    deny.learn(decision, 200.0, "1.1.1.1", "u1", "b", some_plan, layers, 1)
    now[0] = 200.89
    assert deny.refusal("1.1.1.1", "u1", "b", some_plan) is not None
    assert deny.refusal("1.1.1.1", "u1", "b", Plan("p", 1, 1)) is None   # another plan
    now[0] = 200.9
    # The door does not take the probe (its requests go on to Flask, which asks the store)...
    assert deny.caller("u1", "b", some_plan, probe=False) is None
    assert deny.caller("u1", "b", some_plan, probe=False) is None
    assert deny.refusal("1.1.1.1", "u1", "b", some_plan) is None   # ...one request asks
    now[0] = 200.95
    assert deny.refusal("1.1.1.1", "u1", "b", some_plan) is not None   # the rest do not
    now[0] = 201.0
    assert deny.refusal("1.1.1.1", "u1", "b", some_plan) is None   # a second, at most
    assert len(deny) == 0
