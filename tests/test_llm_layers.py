"""LLM units at the engine: reserve, settle, cancel, leases, dollars, the upstream guard."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from types import MappingProxyType

import pytest
import redis

from limiting.core.ask import Ask
from limiting.core.decision import Decision, GuardRefused, Refused
from limiting.core.llm import Usage, estimate_input_tokens
from limiting.core.policy import parse_policy
from limiting.core.upstream import pacing_args, parse_duration
from limiting.engine import Engine
from limiting.reservation import Reservation
from limiting.stores.storage import open_store
from limiting.stores.store import Store

POLICY = {
    "plans": {
        "p": {"burst": 100, "refill_per_second": 100, "quotas": ["1000 per day"],
              "tokens_per_minute": 100, "input_tokens_per_minute": 60,
              "output_tokens_per_minute": 80, "max_concurrent": 2,
              "budget_usd_per_day": 1.0},
    },
    "models": {"gpt-x": {"provider": "openai", "requests_per_minute": 3,
                         "input_usd_per_million": 1000, "output_usd_per_million": 2000}},
}


@pytest.fixture(params=["redis", "memory"])
def engine(request: pytest.FixtureRequest, r: redis.Redis, redis_url: str) -> Iterator[Engine]:
    store: Store = open_store(redis_url if request.param == "redis" else "memory://")
    # check-config refuses a lease this short (it must outlive a renewal); the engine takes it,
    # which lets the TTL tests below run in a second.
    policy = parse_policy(POLICY)
    plans = {"p": replace(policy.plans["p"], lease_ttl_seconds=1)}
    yield Engine(store, replace(policy, plans=MappingProxyType(plans)))
    store.close()


def reserve(engine: Engine, user: str, inp: int, out: int, model: str = "echo",
            guard: bool = False) -> tuple[Decision, Reservation | None, float | None]:
    """(the user's decision, the reservation if all passed, the guard's wait if it refused;
    -1.0: never)."""
    policy = engine.policy
    ask = Ask(model, policy.models.get(model), inp, out)
    try:
        res = engine.reserve(user, policy.plans["p"], ask, guard=guard)
    except Refused as exc:
        return exc.decision, None, None
    except GuardRefused as exc:
        return exc.decision, None, -1.0 if exc.wait is None else exc.wait
    return res.decision, res, None


def remaining(engine: Engine, user: str) -> dict[str, int]:
    return {s.layer.name: s.remaining for s in engine.peek(user).states}


def test_tokens_reserved_then_settled_to_actual(engine: Engine) -> None:
    d, res, _ = reserve(engine, "t", 30, 50)
    assert d.allowed and res is not None
    left = remaining(engine, "t")
    assert (left["tokens-minute"], left["input-tokens-minute"], left["output-tokens-minute"]) \
        == (20, 30, 30)
    d2, _res2, _ = reserve(engine, "t", 30, 50)
    assert not d2.allowed and d2.refused is not None
    assert d2.refused.layer.name in ("tokens-minute", "input-tokens-minute")
    assert 0 < d2.wait <= 61
    res.settle(Usage(input_tokens=10, output_tokens=5))
    left = remaining(engine, "t")
    assert (left["tokens-minute"], left["input-tokens-minute"], left["output-tokens-minute"]) \
        == (85, 50, 75)
    res.settle(Usage(input_tokens=99, output_tokens=99))   # idempotent: the first one counts
    assert remaining(engine, "t")["tokens-minute"] == 85


def test_refused_reservation_charges_nothing(engine: Engine) -> None:
    before = remaining(engine, "n")
    d, res, _ = reserve(engine, "n", 10, 95)   # output 95 > 80 per minute: can never pass
    assert not d.allowed and res is None and d.wait is None
    assert remaining(engine, "n") == before


def test_cached_input_is_not_input(engine: Engine) -> None:
    _, res, _ = reserve(engine, "c", 30, 10)
    res.settle(Usage(input_tokens=30, output_tokens=10, cached_input_tokens=25))
    left = remaining(engine, "c")
    assert left["input-tokens-minute"] == 55 and left["tokens-minute"] == 85


def test_cancel_returns_every_unit_but_counts_the_request(engine: Engine) -> None:
    _, res, _ = reserve(engine, "x", 20, 20)
    res.cancel()
    left = remaining(engine, "x")
    assert left["tokens-minute"] == 100 and left["concurrent"] == 2
    assert left["quota-day"] == 999


# The engine fixture's lease TTL. A lease taken after ``began`` (monotonic) is surely live
# while less than this has passed since: the store set its expiry after the call was sent.
# So "the cap holds" is asserted when that is so (always, on a quick machine); a stall past
# the TTL may honestly have freed a lease.
LEASE_TTL = 1.0


def live_since(began: float) -> bool:
    return time.monotonic() - began < LEASE_TTL


def test_leases_cap_requests_in_flight_and_free_by_ttl(engine: Engine) -> None:
    began = time.monotonic()
    held = [reserve(engine, "l", 1, 1)[1] for _ in range(2)]
    d, res, _ = reserve(engine, "l", 1, 1)
    if live_since(began):
        assert not d.allowed and d.refused.layer.name == "concurrent" and d.retry_after == 1
    elif res is not None:
        res.settle(Usage(1, 1))     # a lease expired in a stall: this one is not under test
    held[0].settle(Usage(1, 1))
    began = time.monotonic()
    assert reserve(engine, "l", 1, 1)[0].allowed
    # Nobody releases these two: a killed worker. Their TTL (1 s) frees them.
    d, _, _ = reserve(engine, "l", 1, 1)
    assert not d.allowed or not live_since(began)
    time.sleep(1.1)
    assert reserve(engine, "l", 1, 1)[0].allowed


def test_renew_keeps_a_stream_lease(engine: Engine) -> None:
    began = time.monotonic()
    _, a, _ = reserve(engine, "s", 1, 1)
    _, b, _ = reserve(engine, "s", 1, 1)
    # Each renewal must reach the store within the TTL of the last (a renewal's reply back
    # within LEASE_TTL of the previous call's send proves it did); on a stalled machine one
    # may not have, and then the leases may honestly be gone.
    kept = True
    for _ in range(3):
        time.sleep(0.4)
        a.renew()
        b.renew()
        kept = kept and live_since(began)
        began = time.monotonic()
    d, _, _ = reserve(engine, "s", 1, 1)
    assert not d.allowed or not (kept and live_since(began))


def test_dollar_budget(engine: Engine) -> None:
    # 10 in + 20 out at $1000/$2000 per million = $0.05 reserved each time.
    for _ in range(20):
        _, res, _ = reserve(engine, "d", 10, 20, model="gpt-x")
        assert res is not None
        res.settle(Usage(10, 20))
        engine.store.delete([f"rl:{{u:d}}:{s}" for s in ("t60", "ti60", "to60")])
    d, _, _ = reserve(engine, "d", 10, 20, model="gpt-x")
    assert not d.allowed and d.refused.layer.name == "usd-day"


def test_guard_refusal_charges_the_user_nothing(engine: Engine) -> None:
    for user in ("g1", "g2", "g3"):
        d, res, wait = reserve(engine, user, 1, 1, model="gpt-x", guard=True)
        assert d.allowed and wait is None
        res.settle(Usage(1, 1))
    before = remaining(engine, "g4")
    d, res, wait = reserve(engine, "g4", 1, 1, model="gpt-x", guard=True)
    assert res is None and wait is not None and 0 < wait <= 61
    if isinstance(engine.store, type(open_store("memory://"))):
        return
    assert remaining(engine, "g4") == before


def test_pacing_learnt_from_headers_slows_every_worker(r: redis.Redis, redis_url: str) -> None:
    engine = Engine(open_store(redis_url, timeout=2.0), parse_policy(POLICY))
    engine.observe("gpt-x", {"x-ratelimit-remaining-requests": "0",
                             "x-ratelimit-reset-requests": "2s",
                             "x-ratelimit-remaining-tokens": "5000",
                             "x-ratelimit-reset-tokens": "1s"}, 200)
    observed = time.monotonic()    # the hold counts down from (after) this
    _d, res, wait = reserve(engine, "pace", 1, 1, model="gpt-x", guard=True)
    assert res is None and 2 - (time.monotonic() - observed) - 0.01 < wait <= 2.01
    observed = time.monotonic()
    engine.observe("gpt-x", {"retry-after-ms": "1500"}, 429)
    _, _, wait = reserve(engine, "pace", 1, 1, model="gpt-x", guard=True)
    assert wait is not None and wait > 1.5 - (time.monotonic() - observed) - 0.01
    time.sleep(2.05)
    assert reserve(engine, "pace", 1, 1, model="gpt-x", guard=True)[1] is not None


def test_pacing_counts_down_between_observations(r: redis.Redis, redis_url: str) -> None:
    engine = Engine(open_store(redis_url, timeout=2.0), parse_policy(POLICY | {"models": {}}))
    engine.observe("claude-x", {"anthropic-ratelimit-requests-remaining": "2",
                                "anthropic-ratelimit-requests-reset": "2099-01-01T00:00:00Z"},
                   200)
    outcomes = [reserve(engine, f"u{i}", 1, 1, model="claude-x", guard=True)[2] is None
                for i in range(3)]
    assert outcomes == [True, True, False]


def test_header_parsing() -> None:
    assert parse_duration("6m0s") == 360 and parse_duration("12ms") == 0.012
    assert parse_duration("1h2m3.5s") == 3723.5 and parse_duration("2") == 2
    assert pacing_args({"Retry-After": "3"}, 529) == [-1, -1, -1, -1, 3_000_000]
    assert pacing_args({"content-type": "x"}, 200) is None


def test_estimate_is_above_word_counts() -> None:
    text = "The quick brown fox jumps over the lazy dog " * 20
    est = estimate_input_tokens([{"role": "user", "content": text}])
    assert est >= len(text.split()) + 4
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi there"}]}]
    assert estimate_input_tokens(parts, system="be brief") > 0


def test_observer_coalesces_routine_headers_and_writes_holds_at_once() -> None:
    from limiting.core.upstream import Observer

    written: list[tuple[str, list[int]]] = []
    observer = Observer(lambda model, args: written.append((model, args)), interval=0.05)
    for left in (9, 8, 7):
        observer.submit("m", {"x-ratelimit-remaining-requests": str(left),
                              "x-ratelimit-reset-requests": "1s"}, 200)
    assert written == []                       # routine headers wait for the writer
    observer.submit("m", {"retry-after": "2"}, 429)
    assert written == [("m", [-1, -1, -1, -1, 2_000_000])]   # a hold goes out at once
    deadline = time.monotonic() + 30    # a deadline for a loaded box; done in ~0.05 s
    while len(written) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert written[1] == ("m", [7, 1_000_000, -1, -1, 0])     # only the latest of the three


def leases(event: str) -> float:
    from limiting import metrics

    metrics.flush()   # the admitted path's counts are buffered up to a second
    value: float = metrics.LEASES.labels(event)._value.get()
    return value


def test_leases_are_counted_taken_returned_and_left_to_expire(engine: Engine) -> None:
    """The counts deploy/prometheus/'s lease-leak alert reads: every lease taken is returned
    once, and one whose finish cannot reach the store is counted as left to its TTL."""
    taken, returned, left = leases("taken"), leases("returned"), leases("left_to_expire")
    _, res, _ = reserve(engine, "m", 1, 1)
    res.settle(Usage(1, 1))
    res.cancel()   # a second finish is a no-op: not returned twice
    assert (leases("taken"), leases("returned")) == (taken + 1, returned + 1)

    _, res, _ = reserve(engine, "m", 1, 1)
    dead = open_store("redis://127.0.0.1:1")   # nothing listens: the settle fails
    try:
        res.store = dead
        res.settle(Usage(1, 1))
    finally:
        dead.close()
    assert leases("left_to_expire") == left + 1
    assert (leases("taken"), leases("returned")) == (taken + 2, returned + 2)
