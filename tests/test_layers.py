"""Each layer's semantics, on the real Lua script (Valkey) and on memory:// alike."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import pytest
import redis

from limiting.core.codec import AcquireCall, Costs, decode_acquire
from limiting.core.layers import compile_plan
from limiting.core.policy import parse_policy
from limiting.core.upstream import guard_layers
from limiting.engine import Engine
from limiting.stores.storage import open_store
from limiting.stores.store import Store


def policy(burst: int = 5, refill: float = 1.0, quotas: list[str] | None = None):
    return parse_policy({"plans": {"p": {"burst": burst, "refill_per_second": refill,
                                         "quotas": quotas or []}}}, "test.toml")


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest, r: redis.Redis, redis_url: str) -> Iterator[Store]:
    s = open_store(redis_url if request.param == "redis" else "memory://")
    yield s
    s.close()


def admitted(engine: Engine, user: str, n: int) -> int:
    return sum(engine.acquire(user).allowed for _ in range(n))


def test_bucket_admits_burst_then_refuses_with_honest_wait(store: Store) -> None:
    engine = Engine(store, policy(burst=5, refill=2.0))
    assert admitted(engine, "alice", 8) == 5
    refused = engine.acquire("alice")
    assert not refused.allowed and refused.refused is not None
    assert refused.refused.layer.name == "user"
    assert 0 < refused.wait <= 0.5 + 0.05
    time.sleep(refused.wait)
    assert engine.acquire("alice").allowed


def test_bucket_refills_at_its_rate(store: Store) -> None:
    engine = Engine(store, policy(burst=2, refill=5.0))
    assert admitted(engine, "bob", 3) == 2
    time.sleep(0.45)   # ~2.25 tokens back, capped at 2
    assert admitted(engine, "bob", 3) == 2


def test_users_are_independent(store: Store) -> None:
    engine = Engine(store, policy(burst=3, refill=0.1))
    assert admitted(engine, "a", 5) == 3
    assert admitted(engine, "b", 5) == 3


def test_quota_is_strict_and_refusal_names_it(store: Store) -> None:
    engine = Engine(store, policy(burst=100, refill=100, quotas=["4 per 2 seconds"]))
    assert admitted(engine, "carol", 10) == 4
    d = engine.acquire("carol")
    assert d.refused is not None and d.refused.layer.name == "quota-2s"
    # The wait is exact to the slot: after it the request passes, and not much before.
    assert 0 < d.wait <= 2 + 2 / 60 + 0.05
    time.sleep(d.wait)
    assert engine.acquire("carol").allowed


def test_quota_never_exceeds_limit_in_any_window(store: Store) -> None:
    engine = Engine(store, policy(burst=1000, refill=1000, quotas=["5 per second"]))
    times: list[float] = []
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        if engine.acquire("dave").allowed:
            times.append(time.monotonic())
        time.sleep(0.01)
    for i, t in enumerate(times):
        in_window = [u for u in times[i:] if u - t < 1.0]
        assert len(in_window) <= 5
    # Under-admission is bounded: about 5 per (1 + 1/60) s over 2.5 s.
    assert len(times) >= 10


def test_refused_request_consumes_nothing_in_any_layer(store: Store) -> None:
    engine = Engine(store, policy(burst=3, refill=0.01, quotas=["100 per day", "50 per hour"]))
    assert admitted(engine, "erin", 3) == 3
    before = engine.acquire("erin")
    for _ in range(20):
        assert not engine.acquire("erin").allowed
    after = engine.acquire("erin")
    quotas_before = {s.layer.name: s.remaining for s in before.states}
    quotas_after = {s.layer.name: s.remaining for s in after.states}
    assert quotas_before == quotas_after == {"user": 0, "quota-day": 97, "quota-hour": 47}


def test_quota_refusal_leaves_bucket_untouched(store: Store) -> None:
    engine = Engine(store, policy(burst=10, refill=0.01, quotas=["2 per day"]))
    assert admitted(engine, "fay", 2) == 2
    for _ in range(5):
        d = engine.acquire("fay")
        assert d.refused is not None and d.refused.layer.name == "quota-day"
    user = next(s for s in d.states if s.layer.name == "user")
    assert user.remaining == 8


def test_cost_over_the_limit_never_passes(store: Store) -> None:
    engine = Engine(store, policy(burst=10, refill=1, quotas=["1 per day"]))
    compiled = engine.compiled(engine.policy.plans["p"])
    keys = ["rl:{u:g}:" + s for s in compiled.suffixes]
    args = list(compiled.args)
    args[7] = "2"   # the quota layer's cost
    reply = store.acquire(keys, args)
    assert reply[0] == 0 and reply[1] == 2 and reply[2] == -1


def test_headers_report_limit_remaining_reset(store: Store) -> None:
    engine = Engine(store, policy(burst=10, refill=0.5, quotas=["100 per day"]))
    d = engine.acquire("hal")
    states = {s.layer.name: s for s in d.states}
    assert states["user"].remaining == 9 and math.ceil(states["user"].reset) == 2
    assert states["quota-day"].remaining == 99
    assert 86400 <= states["quota-day"].reset <= 86400 + 1440 + 1


def test_acquire_call_prices_layers_by_unit_and_joins_the_guard() -> None:
    plan = parse_policy({"plans": {"p": {"burst": 5, "refill_per_second": 1,
                                         "tokens_per_minute": 100, "budget_usd_per_day": 1,
                                         "max_concurrent": 2}}}).plans["p"]
    compiled = compile_plan(plan, llm=True)
    costs = Costs(tokens=30, input_tokens=10, output_tokens=20, usd_micros=7, lease="L1")
    own = AcquireCall.priced(["b", "t", "usd", "cc"], compiled.args, compiled.per_call, costs)
    layers = decode_acquire(own.args)
    assert [(c.kind, c.cost) for c in layers] == [("b", "1"), ("W", "30"), ("W", "7"),
                                                  ("c", "L1")]
    assert compiled.args[7] == b"1" and own.size == 4      # the template is left as it was
    guard = AcquireCall.of(["rpm", "pace"], guard_layers("gpt-x", None)[-1:] * 2, costs)
    joined = own.join(guard)
    assert joined.keys == ["b", "t", "usd", "cc", "rpm", "pace"] and joined.size == 6
    assert [c.cost for c in decode_acquire(joined.args)[4:]] == ["30", "30"]
    # The built-in echo has no provider to pace to: no guard layers at all.
    assert guard_layers("echo", None) == ()
