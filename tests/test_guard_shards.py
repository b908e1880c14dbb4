"""No hot keys: ``[models."…"] shards = N`` spreads the model's guard over N slots.

Each shard holds its part of every limit (floor or ceil: the parts sum to the limit), a
request picks one at random and tries one other before refusing, and the provider's learnt
pacing is split the same way. On one server and on the real 3-master Cluster.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from limiting.core.ask import Ask
from limiting.core.capacity import pace_share, shard_share
from limiting.core.decision import GuardRefused
from limiting.core.policy import Policy, PolicyError, parse_policy
from limiting.core.upstream import model_prefix
from limiting.engine import Engine
from limiting.stores.storage import open_store
from tests import topologies
from tests.test_cluster import keys_by_master, keyslot
from tests.topologies import Cluster

cluster = topologies.cluster
cluster_url = topologies.cluster_url

BIG = {"burst": 100_000, "refill_per_second": 100_000, "quotas": ["1000000 per day"]}


def _policy(model: str, **limits: object) -> Policy:
    return parse_policy({"plans": {"p": BIG, "pro": BIG},
                         "models": {model: {"provider": "openai", **limits}}}, "t.toml")


def _admitted(engine: Engine, pol: Policy, model: str, n: int, threads: int = 1,
              plan: str = "p") -> int:
    def one(i: int) -> bool:
        try:
            engine.reserve(f"u{i}", pol.plans[plan], Ask(model, pol.models[model], 5, 5))
            return True
        except GuardRefused:
            return False
    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, range(n)))


def test_shares_sum_to_the_limit_exactly() -> None:
    for limit in (1, 7, 10, 80, 1001, 30_000):
        for shards in (1, 2, 3, 8, 13):
            parts = [shard_share(limit, shards, i) for i in range(shards)]
            assert sum(parts) == limit and max(parts) - min(parts) <= 1
    split = [pace_share([10, 5_000, 7, 9_000, 0], 4, i) for i in range(4)]
    assert [s[0] for s in split] == [3, 3, 2, 2] and [s[2] for s in split] == [2, 2, 2, 1]
    assert {(s[1], s[3], s[4]) for s in split} == {(5_000, 9_000, 0)}   # resets, hold: alike
    assert pace_share([-1, -1, -1, -1, 3_000], 4, 3) == [-1, -1, -1, -1, 3_000]


@pytest.mark.parametrize(("limits", "reason"), [
    ({"shards": 0}, "shards: must be a positive number"),
    ({"shards": 257}, "shards: must be at most 256"),
    ({"shards": 2.5}, "shards: must be an integer"),
    ({"requests_per_minute": 7, "shards": 8}, "8 shards of a limit of 7 per minute"),
    ({"requests_per_minute": 8, "shards": 8, "reserve": {"pro": 0.5}},
     "8 shards of a limit of 8 per minute"),
])
def test_bad_shards_fail_with_key_and_reason(limits: dict[str, object], reason: str) -> None:
    with pytest.raises(PolicyError, match=reason):
        _policy("m", **limits)


def test_one_server_never_admits_past_the_limit(r: redis.Redis, redis_url: str) -> None:
    pol = _policy("gpt-sharded", requests_per_minute=40, shards=4)
    engine = Engine(open_store(redis_url, timeout=2.0), pol)
    admitted = _admitted(engine, pol, "gpt-sharded", 100, threads=8)
    # Two tries of four: a request is refused only when both shards it tried are full.
    assert 30 <= admitted <= 40
    keys = sorted(k.decode() for k in r.keys("rl:{m:gpt-sharded*"))
    assert keys == sorted(f"rl:{{m:gpt-sharded:{i}}}:rpm" for i in range(4))
    # Seen as one guard: the whole limit, every shard's remaining added up.
    state = engine.peek_model("gpt-sharded").states[0]
    assert state.layer.limit == 40 and state.remaining == 40 - admitted
    # A few more, and every shard fills: not one past the limit.
    assert admitted + _admitted(engine, pol, "gpt-sharded", 60) == 40


def test_a_shard_keeps_the_reserve_share(r: redis.Redis, redis_url: str) -> None:
    pol = _policy("gpt-kept", requests_per_minute=20, shards=2, reserve={"pro": 0.2})
    engine = Engine(open_store(redis_url, timeout=2.0), pol)
    # Each shard of 10: 8 for the others, 10 for pro.
    assert _admitted(engine, pol, "gpt-kept", 40) == 16
    assert _admitted(engine, pol, "gpt-kept", 10, plan="pro") == 4


def test_pacing_is_split_over_the_shards(r: redis.Redis, redis_url: str) -> None:
    pol = _policy("gpt-paced", requests_per_minute=1000, shards=4)
    engine = Engine(open_store(redis_url, timeout=2.0), pol)
    # The provider says 6 requests are left: the shards spend 6 together, not 4 x 6.
    engine.observe("gpt-paced", {"x-ratelimit-remaining-requests": "6",
                                 "x-ratelimit-reset-requests": "30s"}, 200)
    left = [int(r.hget(model_prefix("rl:", "gpt-paced", i) + "pace", "rl") or 0)
            for i in range(4)]
    assert sorted(left) == [1, 1, 2, 2]
    assert _admitted(engine, pol, "gpt-paced", 20) <= 6
    # A hold (a 429 from the provider) holds every shard.
    engine.observe("gpt-paced", {"retry-after": "20"}, 429)
    assert _admitted(engine, pol, "gpt-paced", 5) == 0


# --- the real 3-master Cluster ------------------------------------------------------------------

def test_cluster_guard_lands_on_n_slots_and_never_passes_the_limit(
        cluster: Cluster, cluster_url: str) -> None:
    model = f"gpt-{uuid.uuid4().hex[:8]}"
    pol = _policy(model, requests_per_minute=80, shards=8)
    engine = Engine(open_store(cluster_url, timeout=2.0), pol)
    admitted = _admitted(engine, pol, model, 240, threads=25)
    assert 60 <= admitted <= 80, admitted
    # The guard's keys: 8 slots (one per shard), spread over more than one master.
    found = keys_by_master(cluster, f"rl:{{m:{model}:*")
    keys = [k for ks in found.values() for k in ks]
    assert sorted(keys) == sorted(model_prefix("rl:", model, i) + "rpm" for i in range(8))
    slots = {keyslot(cluster, k) for k in keys}
    assert len(slots) == 8
    assert len(found) >= 2, found
    for port, ks in found.items():
        assert {cluster.owner(keyslot(cluster, k)).port for k in ks} == {port}
    # The users' requests the guard turned away got their charges back, in their slots.
    state = engine.peek_model(model).states[0]
    assert state.remaining == 80 - admitted
    used = [1_000_000 - engine.peek(f"u{i}", pol.plans["p"]).states[1].remaining
            for i in range(240)]
    assert sum(used) == admitted
    # More requests fill every shard, and never one past the limit.
    assert admitted + _admitted(engine, pol, model, 160, threads=25) == 80
