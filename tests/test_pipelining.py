"""Under gevent, the script calls of concurrent requests share round trips (limiting/pipelining.py).

Each case runs real greenlets in a gevent-patched subprocess (tests/greenlet_calls.py)
against the session's Valkey: sharing must keep every call its own atomic decision.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import subprocess
import sys

import redis

from limiting.core.policy import parse_policy
from limiting.engine import Engine
from limiting.stores.storage import open_store
from tests.conftest import ROOT


def run(url: str, scenario: str, n: int) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "greenlet_calls.py"), url,
                           scenario, str(n)], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_concurrent_calls_share_round_trips(r: redis.Redis, unix_url: str) -> None:
    out = run(unix_url, "distinct", 300)
    assert out["done"] == 300 and out["errors"] == [] and out["allowed"] == 300
    assert out["calls"] == 300
    assert 1 <= out["round_trips"] < 30, out  # ready greenlets join the first one's trip


def test_shared_round_trips_stay_exact(r: redis.Redis, unix_url: str) -> None:
    out = run(unix_url, "exact", 400)
    assert out["errors"] == [] and out["allowed"] == 100  # the burst, never more


def test_script_flush_before_a_shared_trip_reloads_and_answers_all(r: redis.Redis,
                                                                  redis_url: str) -> None:
    out = run(redis_url, "flush", 200)
    assert out["errors"] == [] and out["allowed"] == 200 and out["unavailable"] == 0


def test_a_store_that_never_answers_fails_every_waiter_within_the_budget() -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(512)
        out = run(f"redis://127.0.0.1:{silent.getsockname()[1]}", "silent", 200)
    assert out["done"] == 200 and out["errors"] == []
    assert out["unavailable"] == 200 and out["allowed"] == 0
    assert out["seconds"] < 5, out  # one 50 ms budget per trip, then the breaker, no hang


def test_a_forked_child_does_not_share_the_parents_connection(r: redis.Redis,
                                                               unix_url: str) -> None:
    # gunicorn --preload: an app that decided once in the master must not hand the master's
    # socket to every worker (interleaved replies would answer the wrong request).
    engine = Engine(open_store(unix_url, timeout=2.0), parse_policy(
        {"plans": {"p": {"burst": 1000, "refill_per_second": 1, "quotas": ["1000 per day"]}}}))
    assert engine.acquire("parent").allowed
    _FORKED["engine"] = engine  # the children inherit it, socket and all
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        remaining = pool.map(_decide_in_child, range(40))
    assert engine.acquire("parent").allowed
    assert sorted(remaining) == list(range(1000 - 40, 1000))  # 40 exact, distinct answers


_FORKED: dict[str, Engine] = {}


def _decide_in_child(_: int) -> int:
    decision = _FORKED["engine"].acquire("child")
    assert decision.allowed
    return decision.states[0].remaining
