"""Fallback models (issue 21 item 1) at the engine: when the asked model's guard, or a layer
counting its tokens or dollars, would refuse, the first fallback that admits serves, charged
and settled at its prices; a refusal by a layer counting requests stays a refusal.

On the session Valkey (one server: acquire.lua's ALTERNATIVES, one call) and on memory://
(the executor's alternatives in turn, as on a Cluster); the 3-master Cluster at the end.
The HTTP faces (both SDKs, plain and streamed, under gunicorn): test_fallbacks_gunicorn.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from limiting.core.ask import Ask, fallback_asks
from limiting.core.decision import GuardRefused, Refused
from limiting.core.groups import joined
from limiting.core.llm import Usage
from limiting.core.policy import Policy, PolicyError, parse_policy
from limiting.engine import Engine
from limiting.ledger import Ledger
from limiting.reservation import Reservation
from limiting.stores.storage import open_store
from tests import topologies

cluster = topologies.cluster
cluster_url = topologies.cluster_url

# Micro-dollars of 1000 input + 1000 output tokens: gpt-4o 12 500, gpt-4o-mini 750.
BIG, MINI = 12_500, 750


def policy(asked_rpm: int = 1, mini_rpm: int = 5, budget: float = 100.0,
           burst: int = 1000, **plan: Any) -> Policy:
    return parse_policy({
        "plans": {"p": {"burst": burst, "refill_per_second": 0.001, "quotas": ["1000 per day"],
                        "budget_usd_per_day": budget, **plan}},
        "models": {
            "gpt-4o": {"provider": "openai", "requests_per_minute": asked_rpm,
                       "input_usd_per_million": 2.5, "output_usd_per_million": 10,
                       "fallbacks": ["gpt-4o-mini"]},
            "gpt-4o-mini": {"provider": "openai", "requests_per_minute": mini_rpm,
                            "input_usd_per_million": 0.15, "output_usd_per_million": 0.6},
        }})


@pytest.fixture(params=["redis", "memory"])
def url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("redis_url") if request.param == "redis" else "memory://"


class Bench:
    """One engine on a fresh namespace (the session Valkey is shared), closed at the end."""

    def __init__(self, url: str, pol: Policy) -> None:
        self.store = open_store(url, timeout=2.0)
        self.namespace = f"rl:{uuid.uuid4().hex[:8]}:"
        self.engine = Engine(self.store, pol, self.namespace)
        self.plan = pol.plans["p"]

    def reserve(self, user: str = "u", model: str = "gpt-4o", fallbacks: bool = True
                ) -> Reservation:
        pol = self.engine.policy
        return self.engine.reserve(user, self.plan, Ask(model, pol.model(model), 1000, 1000),
                                   fallbacks=fallbacks)

    def usd_left(self, user: str = "u") -> int:
        states = {s.layer.name: s for s in self.engine.peek(user, self.plan).states}
        return states["usd-day"].remaining

    def guard_left(self, model: str) -> int:
        return self.engine.peek_model(model).states[0].remaining


@pytest.fixture
def make(url: str) -> Iterator[Any]:
    made: list[Bench] = []

    def build(pol: Policy) -> Bench:
        made.append(Bench(url, pol))
        return made[-1]

    yield build
    for bench in made:
        bench.store.close()


# --- the policy -----------------------------------------------------------------------------


@pytest.mark.parametrize(("fallbacks", "models", "reason"), [
    (["gpt-9"], {}, "names no model under [models]"),
    (["gpt-4o"], {}, "is this model itself"),
    (["claude"], {"claude": {"provider": "anthropic"}}, "never leaves the provider"),
    (["m", "m"], {"m": {"provider": "openai"}}, "listed twice"),
    ([""], {}, "must be a model name"),
    ("m", {}, "must be a list"),
])
def test_fallbacks_are_checked(fallbacks: Any, models: dict[str, Any], reason: str) -> None:
    with pytest.raises(PolicyError) as exc:
        parse_policy({"plans": {"p": {"burst": 1, "refill_per_second": 1}},
                      "models": {"gpt-4o": {"provider": "openai", "fallbacks": fallbacks},
                                 **models}})
    assert 'models."gpt-4o".fallbacks' in str(exc.value) and reason in str(exc.value)


def test_plan_fallbacks_is_a_bool_and_an_alias_may_be_a_fallback() -> None:
    with pytest.raises(PolicyError, match=r"plans\.p\.fallbacks"):
        parse_policy({"plans": {"p": {"burst": 1, "refill_per_second": 1, "fallbacks": "no"}}})
    pol = parse_policy({"plans": {"p": {"burst": 1, "refill_per_second": 1,
                                        "fallbacks": False}},
                        "models": {"a": {"provider": "openai", "fallbacks": ["b-2024"]},
                                   "b": {"provider": "openai", "aliases": ["b-2024"],
                                         "fallbacks": ["a"]}}})
    assert pol.plans["p"].fallbacks is False and pol.models["a"].fallbacks == ("b-2024",)


# --- one engine ----------------------------------------------------------------------------


def test_guard_full_serves_the_fallback_at_its_prices(make: Any) -> None:
    b = make(policy())
    first = b.reserve()
    assert first.served_model is None and first.model_name == "gpt-4o"
    second = b.reserve()
    assert second.served_model == "gpt-4o-mini" and second.model_name == "gpt-4o-mini"
    assert b.usd_left() == 100_000_000 - BIG - MINI
    assert (b.guard_left("gpt-4o"), b.guard_left("gpt-4o-mini")) == (0, 4)
    # The settle prices what the served model reported at its own prices; the ledger books it.
    second.settle(Usage(input_tokens=100, output_tokens=100))
    first.settle(Usage(input_tokens=1000, output_tokens=1000))
    assert b.usd_left() == 100_000_000 - BIG - 75
    ledger = Ledger(b.store, b.namespace)
    spent = ledger.models(ledger.today(), ["gpt-4o", "gpt-4o-mini"])
    assert spent["gpt-4o-mini"].json()["requests"] == 1
    assert spent["gpt-4o"].json()["requests"] == 1


def test_a_dollar_budget_too_small_for_the_asked_model_serves_the_fallback(make: Any) -> None:
    b = make(policy(asked_rpm=100, budget=0.01))    # 10 000 µ$: under BIG, over MINI
    served = b.reserve()
    assert served.served_model == "gpt-4o-mini"
    assert b.usd_left() == 10_000 - MINI
    assert (b.guard_left("gpt-4o"), b.guard_left("gpt-4o-mini")) == (100, 4)


def test_an_empty_request_bucket_is_a_refusal_not_a_fallback(make: Any) -> None:
    b = make(policy(burst=1))
    b.reserve()                                       # the bucket's one request, the guard's
    with pytest.raises(Refused) as exc:
        b.reserve()
    assert exc.value.decision.refused is not None
    assert exc.value.decision.refused.layer.name == "user"
    assert b.guard_left("gpt-4o-mini") == 5           # no fallback was charged


@pytest.mark.parametrize("how", ["plan", "request"])
def test_fallbacks_turned_off_refuse_at_the_guard(make: Any, how: str) -> None:
    b = make(policy(fallbacks=how != "plan"))
    b.reserve()
    with pytest.raises(GuardRefused):
        b.reserve(fallbacks=how != "request")
    assert b.guard_left("gpt-4o-mini") == 5
    assert b.usd_left() == 100_000_000 - BIG


def test_every_alternative_full_waits_for_the_soonest(make: Any) -> None:
    b = make(policy(mini_rpm=1))
    b.reserve(model="gpt-4o-mini")      # the fallback's guard full first ...
    time.sleep(2.2)                     # ... two of the window's 1 s slots earlier
    b.reserve()
    with pytest.raises(GuardRefused) as exc:
        b.reserve()
    # The asked model's guard frees in ~60 s, the fallback's ~2 s sooner: that is the wait.
    assert exc.value.wait is not None and 55 < exc.value.wait < 59
    assert b.usd_left() == 100_000_000 - BIG - MINI


def test_exact_under_threads(make: Any) -> None:
    n, m = 7, 5
    b = make(policy(asked_rpm=n, mini_rpm=m))

    def one(i: int) -> str | None:
        try:
            return b.reserve(f"t{i % 4}").model_name
        except GuardRefused:
            return None

    with ThreadPoolExecutor(8) as pool:
        served = list(pool.map(one, range(30)))
    assert served.count("gpt-4o") == n and served.count("gpt-4o-mini") == m
    assert served.count(None) == 30 - n - m
    spent = sum(100_000_000 - b.usd_left(f"t{i}") for i in range(4))
    assert spent == n * BIG + m * MINI


def test_a_model_without_fallbacks_sends_the_call_as_before(make: Any) -> None:
    """No fallbacks (or turned off): no alternatives, so the same keys, arguments and reply."""
    b = make(policy())
    pol = b.engine.policy
    ask = Ask("gpt-4o-mini", pol.model("gpt-4o-mini"), 10, 10)
    assert fallback_asks(pol, ask) == ()
    plan = b.engine.planner.reservation("u", None, b.plan, "gpt-4o-mini", ask.costs())
    assert plan.alternatives == () and plan.guard is not None
    call = joined([*plan.groups, plan.guard])
    assert len(call.args) == 4 * call.size
    assert len(b.store.acquire(call.keys, call.args)) == 4 + 2 * call.size


# --- a 3-master Cluster: each alternative in turn, with undo ---------------------------------


def test_cluster_serves_the_fallback_exactly(cluster_url: str) -> None:
    b = Bench(cluster_url, policy(asked_rpm=3, mini_rpm=2))
    try:
        with ThreadPoolExecutor(6) as pool:
            served = list(pool.map(lambda i: _served(b, f"c{i}"), range(10)))
        assert served.count("gpt-4o") == 3 and served.count("gpt-4o-mini") == 2
        # A user turned away by both guards was charged nothing, in its own slot.
        refused = [f"c{i}" for i, name in enumerate(served) if name is None]
        assert len(refused) == 5 and b.usd_left(refused[0]) == 100_000_000
        mini = [f"c{i}" for i, name in enumerate(served) if name == "gpt-4o-mini"]
        assert b.usd_left(mini[0]) == 100_000_000 - MINI
    finally:
        b.store.close()


def _served(b: Bench, user: str) -> str | None:
    try:
        return b.reserve(user).model_name
    except GuardRefused:
        return None
