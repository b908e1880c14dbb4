"""The spend ledger on a real Redis Cluster: the user's day hashes ride in the user's own
settle (their slot), the day-wide keys go in one more call to the day's slot, and reading
them back crosses slots."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

from limiting.core.ask import Ask
from limiting.core.llm import Usage
from limiting.core.naming import user_prefix
from limiting.core.policy import parse_policy
from limiting.engine import Engine
from limiting.ledger import Ledger
from limiting.stores.storage import open_store
from tests import topologies

cluster = topologies.cluster
cluster_url = topologies.cluster_url


def test_the_ledger_on_a_cluster(cluster: topologies.Cluster, cluster_url: str) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    pol = parse_policy({"plans": {"p": {"burst": 100, "refill_per_second": 100,
                                        "budget_usd_per_day": 1000}},
                        "models": {model: {"provider": "openai", "requests_per_minute": 1000,
                                           "input_usd_per_million": 1,
                                           "output_usd_per_million": 2}}})
    store = open_store(cluster_url, timeout=2.0)
    engine = Engine(store, pol)
    users = [f"led-{uuid.uuid4().hex[:8]}" for _ in range(30)]

    def one(user: str) -> None:
        with engine.reserve(user, pol.plans["p"], Ask(model, pol.models[model], 100, 50,
                                                      key_id="kid")) as r:
            r.settle(Usage(100, 25))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, users))
    ledger = Ledger(store)
    day = ledger.today()
    spent = [ledger.history(u, "u", [day])[0] for u in users]
    assert all(s.usd_micros == 150 and s.requests == 1 for s in spent)   # 100 * 1 + 25 * 2
    assert ledger.history(users[0], "u", [day], "kid") == [spent[0]]
    assert ledger.models(day, [model])[model].requests == 30
    top = ledger.top(day, 100, model=model)
    assert sorted(row.user for row in top) == sorted(users)
    # The user's ledger lives in the user's slot; the day's ranking elsewhere.
    assert user_prefix("rl:", users[0]) in ledger.keys.user(users[0], "u", day)
