"""A request's plan and its one executor (issue 20, items 1 and 3): kinds and realms carry
their rules, and acquire and reserve run their plans alike, on Valkey and memory://."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from limiting.core.ask import Ask
from limiting.core.codec import AcquireCall, Kind, Realm, given_back
from limiting.core.decision import GuardRefused, Refused
from limiting.core.groups import CallPlan, Group
from limiting.core.layers import Layer
from limiting.core.policy import parse_policy
from limiting.engine import Engine
from limiting.stores.storage import open_store
from limiting.stores.store import Store
from tests import topologies


def test_kinds_and_realms_carry_their_rules() -> None:
    assert Kind.BUCKET.code(shared=True) == "B" and Kind.WINDOW.code(shadow=True) == "w?"
    assert Kind.window_of("requests") is Kind.WINDOW
    assert Kind.window_of("usd_micros") is Kind.WIDE_WINDOW
    assert not Kind.EDGE.undoable and not Kind.PACE.undoable and Kind.MONTH.undoable
    lease = Layer("concurrent", "c", "cc", 2, 5e6, 5, "fail_open", "leases")
    assert lease.kind is Kind.LEASE   # a kind given by its letter is the enum's
    assert given_back(lease, 1, "id-1") == (Kind.LEASE, 5e6, "id-1")   # a lease is released
    bucket = Layer("user", Kind.BUCKET, "b", 10, 1, 10, "fail_open")
    assert given_back(bucket, 3) == (Kind.BUCKET, 10, -3)   # told its capacity
    assert [Realm(r).org for r in ("u", "b")] == [Realm.KEY_ORG, Realm.BODY_ORG]
    assert f"{Realm.BODY_ORG}" == "ob"   # keys are spelt with the letters


def test_a_cluster_plan_calls_each_slot_once_in_order_of_first_appearance() -> None:
    def group(tag: str) -> Group:
        return Group((), AcquireCall([], []), tag, ())

    a1, b, a2 = group("a"), group("b"), group("a")
    plan = CallPlan([a1, b, a2])
    assert plan.calls(one_server=False) == [[a1, a2], [b]]
    assert plan.calls(one_server=True) == [[a1, b, a2]]
    assert plan.guard is None   # the model's guard is charged last, apart


POLICY = {
    "plans": {"p": {"burst": 5, "refill_per_second": 0.001}},
    "orgs": {"acme": {"quotas": ["1 per day"]}},
    # Two shards of 1 request a minute each: a full shard sends a request to the other.
    "models": {"m": {"provider": "openai", "requests_per_minute": 2, "shards": 2}},
}


@pytest.fixture(params=["redis", "memory"])
def engine(request: pytest.FixtureRequest, r: redis.Redis, redis_url: str) -> Iterator[Engine]:
    store: Store = open_store(redis_url if request.param == "redis" else "memory://")
    yield Engine(store, parse_policy(POLICY, "t.toml"))
    store.close()


def bucket(engine: Engine, user: str) -> int:
    return engine.peek(user, engine.policy.plans["p"]).states[0].remaining


def test_an_org_refusal_charges_the_member_nothing(engine: Engine) -> None:
    plan, acme = engine.policy.plans["p"], engine.policy.orgs["acme"]
    assert engine.acquire("ann", plan=plan, org=acme).allowed
    with pytest.raises(Refused) as refused:
        engine.reserve("bob", plan, Ask("m", engine.policy.model("m"), 1, 1), org=acme)
    assert refused.value.decision.refused is not None
    assert refused.value.decision.refused.layer.name == "org:acme/quota-day"
    assert bucket(engine, "bob") == 5   # one call: nothing was charged
    assert not engine.acquire("bob", plan=plan, org=acme).allowed   # acquire says the same


def test_a_full_guard_shard_sends_the_request_to_the_other(engine: Engine) -> None:
    plan, ask = engine.policy.plans["p"], Ask("m", engine.policy.model("m"), 1, 1)
    for user in ("cy", "di"):   # whichever shard each drew, both fit
        engine.reserve(user, plan, ask).charge_reserved()
    with pytest.raises(GuardRefused) as refused:
        engine.reserve("ed", plan, ask)
    assert refused.value.wait is not None and 0 < refused.value.wait <= 61   # the window
    assert bucket(engine, "ed") == 5   # the guard refused: the user's charge is not kept
    assert [s.remaining for s in engine.peek_model("m").states[:1]] == [0]


# --- a Cluster: one call per slot, the guard's last --------------------------------------------


cluster = topologies.cluster
cluster_url = topologies.cluster_url


def test_a_guard_refusal_on_a_cluster_gives_back_every_earlier_slot(
        cluster: topologies.Cluster, cluster_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    pol = parse_policy({
        "plans": {"p": {"burst": 5, "refill_per_second": 0.001, "max_concurrent": 1}},
        "orgs": {f"o-{tag}": {"quotas": ["5 per day"]}},
        "models": {f"m-{tag}": {"provider": "openai", "requests_per_minute": 1}}}, "t.toml")
    store = open_store(cluster_url, timeout=2.0)
    try:
        engine = Engine(store, pol)
        plan, org, model = pol.plans["p"], pol.orgs[f"o-{tag}"], f"m-{tag}"
        ask = Ask(model, pol.model(model), 1, 1)
        engine.reserve(f"a-{tag}", plan, ask, org=org, renews=False).charge_reserved()
        with pytest.raises(GuardRefused):   # the model's one request a minute is taken
            engine.reserve(f"b-{tag}", plan, ask, org=org, renews=False)
        left = {s.layer.name: s.remaining for s in engine.peek(f"b-{tag}", plan, org=org).states}
        # Its bucket, its lease and the org's quota (other slots, charged first) came back.
        assert left["user"] == 5 and left["concurrent"] == 1
        assert left[f"org:o-{tag}/quota-day"] == 4
    finally:
        store.close()
