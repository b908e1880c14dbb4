"""Each layer's semantics, on the real Lua script (Valkey) and on memory:// alike."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import pytest
import redis

from limiting.core.codec import AcquireCall, Costs, decode_acquire
from limiting.core.decision import Decision
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


def timed_admitted(engine: Engine, user: str, n: int) -> tuple[int, float]:
    """How many of ``n`` requests passed, and the seconds they took: a bucket earns tokens
    meanwhile, so a count can be exact only up to what that time refilled."""
    began = time.monotonic()
    return admitted(engine, user, n), time.monotonic() - began


def first_refusal(engine: Engine, user: str) -> Decision:
    """The next refusal (a loaded machine may have earned a token since the last: ask on)."""
    for _ in range(10):
        decision = engine.acquire(user)
        if not decision.allowed:
            return decision
    raise AssertionError(f"{user}: never refused")


def test_bucket_admits_burst_then_refuses_with_honest_wait(store: Store) -> None:
    engine = Engine(store, policy(burst=5, refill=2.0))
    passed, took = timed_admitted(engine, "alice", 8)
    assert 5 <= passed <= 5 + int(took * 2.0)    # 5 unless the 8 took half a second
    refused = first_refusal(engine, "alice")
    assert not refused.allowed and refused.refused is not None
    assert refused.refused.layer.name == "user"
    assert 0 < refused.wait <= 0.5 + 0.05
    time.sleep(refused.wait)
    assert engine.acquire("alice").allowed


def test_bucket_refills_at_its_rate(store: Store) -> None:
    engine = Engine(store, policy(burst=2, refill=5.0))
    passed, took = timed_admitted(engine, "bob", 3)
    assert 2 <= passed <= 2 + int(took * 5.0)      # 2 unless the 3 took a fifth of a second
    first_refusal(engine, "bob")                   # empty now
    time.sleep(0.45)   # ~2.25 tokens back, capped at 2
    passed, took = timed_admitted(engine, "bob", 3)
    assert 2 <= passed <= 2 + int(took * 5.0)


def test_users_are_independent(store: Store) -> None:
    engine = Engine(store, policy(burst=3, refill=0.1))
    assert admitted(engine, "a", 5) == 3
    assert admitted(engine, "b", 5) == 3


def test_quota_is_strict_and_refusal_names_it(store: Store) -> None:
    engine = Engine(store, policy(burst=100, refill=100, quotas=["4 per 2 seconds"]))
    passed, took = timed_admitted(engine, "carol", 10)
    # Strict: 4, unless the 10 took so long (2 s less a slot) that the first left the window.
    assert passed == 4 or (passed > 4 and took >= 2 - 2 / 60)
    d = first_refusal(engine, "carol")
    assert d.refused is not None and d.refused.layer.name == "quota-2s"
    # The wait is exact to the slot: after it the request passes, and not much before.
    assert 0 < d.wait <= 2 + 2 / 60 + 0.05
    time.sleep(d.wait)
    assert engine.acquire("carol").allowed


def test_quota_never_exceeds_limit_in_any_window(store: Store) -> None:
    engine = Engine(store, policy(burst=1000, refill=1000, quotas=["5 per second"]))
    times: list[float] = []           # when each admission was sent
    replies: list[float] = []         # when its reply was back
    refusals: list[float] = []        # when each refusal was sent
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        sent = time.monotonic()
        if engine.acquire("dave").allowed:
            times.append(sent)
            replies.append(time.monotonic())
        else:
            refusals.append(sent)
        time.sleep(0.01)
    for i, t in enumerate(times):
        # Admissions the store surely decided within 1 s of this one: sent after it, replied
        # before it was 1 s old (send times alone would over-count on a slow machine).
        in_window = [j for j in range(i, len(times)) if replies[j] - t < 1.0]
        assert len(in_window) <= 5
    # Under-admission is bounded: a refusal is honest only while 5 admissions lie within a
    # window (1 s, plus a slot of 1/60 s) before it. The store decided each admission before
    # its reply was back and each refusal after it was sent, so counting admissions by reply
    # time against the refusal's send time can only over-count: timed this way the check
    # holds however slowly the machine ran the loop.
    window = 1 + 1 / 60 + 0.001
    for refused in refusals:
        assert sum(1 for back in replies if back > refused - window) >= 5, refused
    assert len(times) >= 5


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
