"""Route limits on a real Redis Cluster: a stacked route and the user's plan live in other
hash slots, so they are decided in calls of their own, compensated (tests/topologies.py)."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from redis.crc import key_slot

from limiting.core.ask import Ask
from limiting.core.decision import Refused
from limiting.core.naming import user_prefix
from limiting.core.policy import parse_policy
from limiting.core.routes import sliding_window
from limiting.engine import Engine
from limiting.stores.storage import open_store
from limiting.web.routes import RouteLimits, bind
from tests import topologies

cluster = topologies.cluster
cluster_url = topologies.cluster_url


def team() -> str:
    return "team-" + TEAM


TEAM = uuid.uuid4().hex[:8]


def route_groups(cost: int = -1) -> list:
    """/report's two stacked limits: 30 a day at cost 3 (10 calls), and a shared scope."""
    own = sliding_window("30 per day", key=team, cost=3 if cost < 0 else cost)
    shared = sliding_window("100 per day", key=team, scope="reports",
                            cost=1 if cost < 0 else cost)
    return RouteLimits().groups(bind("report", [own, shared]), None)


def test_stacked_route_and_plan_across_slots_admit_exactly_and_compensate(
        cluster: topologies.Cluster, cluster_url: str) -> None:
    pol = parse_policy({"plans": {"p": {"burst": 5, "refill_per_second": 0.001}}})
    engine = Engine(open_store(cluster_url, timeout=2.0), pol)
    plan = pol.plans["p"]
    users = [f"rc-{TEAM}-{i}" for i in range(60)]
    slots = {key_slot(g.tag.encode()) for g in route_groups()}
    assert len(slots | {key_slot(user_prefix("rl:", users[0]).encode())}) >= 2

    def one(user: str) -> bool:
        return engine.acquire_with(user, None, plan, "u", route_groups()).decision.allowed

    with ThreadPoolExecutor(20) as pool:
        admitted = list(pool.map(one, users))
    assert admitted.count(True) == 10
    # Users the route refused got their plan charge back (the plan's call came first).
    for user, passed in zip(users, admitted, strict=True):
        assert engine.peek(user).states[0].remaining == (4 if passed else 5)
    look = engine.decide(route_groups(cost=0)).decision
    assert [s.remaining for s in look.states] == [0, 90]

    # reserve(): the route's calls first; the plan refusing gives their charge back.
    spent = users[-1]
    for _ in range(5):
        engine.acquire(spent, None, plan)
    fresh = [sliding_window("9 per day", key=team, scope="other-" + TEAM)]
    groups = RouteLimits().groups(bind("report", fresh), None)
    with pytest.raises(Refused) as refused:
        engine.reserve(spent, plan, Ask("echo", None, 10, 10), extra=groups)
    assert refused.value.decision.refused.layer.name == "user"
    after = engine.decide(RouteLimits().groups(
        bind("report", [sliding_window("9 per day", key=team, scope="other-" + TEAM, cost=0)]),
        None)).decision
    assert after.states[0].remaining == 9
