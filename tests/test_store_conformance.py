"""Every store keeps the same promise: one suite, run against one Redis server, a 3-master
Cluster, Sentinel, memory:// and a store registered with ``register_store`` here (memory://
behind the Store protocol alone: any feature that reached past the protocol, for a client or
a MemoryStore, fails on it). Each feature is checked through its public API: acquire and
settle through the engine, API keys, overrides, the spend ledger and the audit trail, then
the narrow methods themselves."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from limiting.audit import MAX_ENTRIES, Audit, record
from limiting.core.ask import Ask
from limiting.core.llm import Usage
from limiting.core.override import Override
from limiting.core.policy import Policy, parse_policy
from limiting.engine import Engine
from limiting.keys import ApiKeys
from limiting.ledger import Ledger
from limiting.overrides import OverrideTable, StoreOverrides
from limiting.stores.memory import MemoryStore
from limiting.stores.storage import OPENERS, open_store, register_store
from limiting.stores.store import Store
from tests import topologies

cluster = topologies.cluster
cluster_url = topologies.cluster_url
sentinel_set = topologies.sentinel_set
sentinel_url = topologies.sentinel_url

SCHEME = "conformance"
MODEL = "conf-model"
# A loaded box must not turn a store call into a timeout (the budget has tests of its own).
PATIENT = 2.0


class Registered:
    """A store of the test's own: memory://'s state, reached through the Store protocol's
    members and nothing else (not a MemoryStore, no client)."""

    single_node = False

    def __init__(self, url: str) -> None:
        self.url = url
        self._inner = MemoryStore(url)


def _forward(name: str) -> Any:
    def call(self: Registered, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._inner, name)(*args, **kwargs)

    call.__name__ = name
    return call


PROTOCOL = sorted(name for name, value in vars(Store).items()
                  if callable(value) and not name.startswith("_"))
for _name in PROTOCOL:
    setattr(Registered, _name, _forward(_name))


STORES = [
    pytest.param("redis_url", id="redis"),
    pytest.param("cluster_url", id="cluster",
                 marks=[pytest.mark.slow, pytest.mark.xdist_group("topology")]),
    pytest.param("sentinel_url", id="sentinel",
                 marks=[pytest.mark.slow, pytest.mark.xdist_group("sentinel")]),
    pytest.param("memory", id="memory"),
    pytest.param("registered", id="registered"),
]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """The store under test. Server stores share their servers with other tests, so every
    test here names its keys under a namespace of its own (``ns``)."""
    if request.param == "memory":
        opened: Store = open_store("memory://")
    elif request.param == "registered":
        register_store(SCHEME, lambda url, timeout, connections: Registered(url))
        request.addfinalizer(lambda: OPENERS.pop(SCHEME, None))
        opened = open_store(f"{SCHEME}://test")
        assert not isinstance(opened, MemoryStore)
    else:
        opened = open_store(request.getfixturevalue(request.param), timeout=PATIENT)
    yield opened
    opened.close()


@pytest.fixture
def ns() -> str:
    return f"conf-{uuid.uuid4().hex[:8]}:"


def conf_policy() -> Policy:
    return parse_policy({
        "plans": {"p": {"burst": 3, "refill_per_second": 0.001, "tokens_per_day": 10_000,
                        "budget_usd_per_day": 1000},
                  "big": {"burst": 1000, "refill_per_second": 1000}},
        "defaults": {"plan": "p"},
        "models": {MODEL: {"provider": "openai", "requests_per_minute": 1000,
                           "input_usd_per_million": 1, "output_usd_per_million": 2}}})


def tokens_left(engine: Engine, user: str) -> int:
    state = next(s for s in engine.peek(user, engine.policy.plans["p"]).states
                 if s.layer.unit == "tokens")
    return state.remaining


def test_acquire_refuses_past_the_limit_and_settle_gives_back(store: Store, ns: str) -> None:
    pol = conf_policy()
    engine = Engine(store, pol, namespace=ns)
    assert [engine.acquire("ann").allowed for _ in range(4)] == [True, True, True, False]
    assert engine.acquire("ann").refused is not None
    assert engine.acquire("ben").allowed   # another user's bucket is their own
    plan, ask = pol.plans["p"], Ask(MODEL, pol.models[MODEL], 100, 900)
    with engine.reserve("cat", plan, ask) as reservation:
        assert reservation.decision.allowed
        assert tokens_left(engine, "cat") == 10_000 - 1000   # reserved: input + max output
        reservation.settle(Usage(100, 50))
    assert tokens_left(engine, "cat") == 10_000 - 150       # settled: the rest given back
    with engine.reserve("cat", plan, ask) as reservation:
        reservation.cancel()                                 # never billed: all given back
    assert tokens_left(engine, "cat") == 10_000 - 150
    with engine.reserve("cat", plan, ask):
        pass                                                 # no usage: kept as reserved
    assert tokens_left(engine, "cat") == 10_000 - 150 - 1000


def test_api_keys_are_created_listed_and_revoked(store: Store, ns: str) -> None:
    keys = ApiKeys(store, "p", ["p", "big"], namespace=ns)
    one, first = keys.create("alice", name="laptop")
    two, second = keys.create("alice", plan="big")
    _, bobs = keys.create("bob")
    found = keys.authenticate(one)
    assert found == first and found.plan == "p" and found.name == "laptop"
    assert keys.authenticate(two) == second
    assert keys.authenticate(one[:-1] + ("A" if one[-1] != "A" else "B")) is None
    assert {r.key_id for r in keys.list()} == {first.key_id, second.key_id, bobs.key_id}
    alices = keys.list("alice")   # oldest first
    assert {r.key_id for r in alices} == {first.key_id, second.key_id}
    assert alices == sorted(alices, key=lambda r: (r.created_at, r.key_id))
    assert keys.revoke(first.key_id) == 1
    assert keys.revoke(first.key_id) == 0 and keys.revoke(one) == 0   # write-once
    assert keys.authenticate(one) is None and keys.authenticate(two) == second
    assert keys.revoke(two) == 1 and keys.authenticate(two) is None   # by the key itself
    assert keys.revoke("nosuchkeyid0") == 0
    listed = {r.key_id: r.revoked for r in keys.list("alice")}
    assert listed == {first.key_id: True, second.key_id: True}
    assert keys.plans_by_user() == {"bob": "p"}


def test_overrides_are_set_seen_and_cleared(store: Store, ns: str) -> None:
    pol = conf_policy()
    table = OverrideTable(store, ns)
    engine = Engine(store, pol, namespace=ns)
    before = table.version()
    table.put("u", "dan", Override(quotas=("1 per day",), set_at=table.now()))
    assert table.version() > before
    version, now, records = table.load()
    assert version == table.version() and abs(now - table.now()) < 60
    assert records == {("u", "dan"): Override(quotas=("1 per day",), set_at=records[
        ("u", "dan")].set_at)}
    source = StoreOverrides(table)
    plan = pol.plans["p"]
    derived = source.plan_for("dan", "u", plan, pol.plans)
    assert derived is not plan and source.plan_for("eve", "u", plan, pol.plans) is plan
    assert [engine.acquire("dan", plan=derived).allowed for _ in range(2)] == [True, False]
    moved = table.version()
    table.bump_deny()
    assert table.version() > moved
    assert table.remove("u", "dan") and not table.remove("u", "dan")
    assert table.load()[2] == {}


def test_the_ledger_books_spend_by_day_user_key_and_model(store: Store, ns: str) -> None:
    pol = conf_policy()
    engine = Engine(store, pol, namespace=ns)
    plan, ask = pol.plans["p"], Ask(MODEL, pol.models[MODEL], 100, 100, key_id="kid")
    for user, usage in (("fay", Usage(100, 25)), ("fay", Usage(100, 25)), ("gus", Usage(10, 5))):
        with engine.reserve(user, plan, ask) as reservation:
            reservation.settle(usage)
    ledger = Ledger(store, ns)
    day = ledger.today()
    assert abs(day - int(datetime.now(UTC).timestamp() // 86_400)) <= 1
    fay = ledger.history("fay", "u", [day - 1, day])
    assert [(s.requests, s.usd_micros, s.input_tokens, s.output_tokens) for s in fay] == [
        (0, 0, 0, 0), (2, 300, 200, 50)]   # 100 * $1 + 25 * $2 per million, twice
    assert ledger.history("fay", "u", [day], key_id="kid") == fay[1:]
    assert ledger.totals([day])[0].requests == 3
    assert ledger.models(day, [MODEL, "other"])[MODEL].usd_micros == 300 + 20
    top = ledger.top(day, 10)
    assert [(row.user, row.score) for row in top] == [("fay", 300), ("gus", 20)]
    assert top[0].spend == fay[1]
    assert [row.user for row in ledger.top(day, 1, by="tok")] == ["fay"]
    assert ledger.top(day, 10, model="other") == []


def test_tags_are_kept_on_keys_shared_as_limits_and_booked_per_tag(store: Store,
                                                                    ns: str) -> None:
    """A key's tags read back as made; a tag's limits (their own slot on a Cluster) are
    shared by every user bearing it, a refusal there charges the user nothing; the ledger
    counts spend per tag."""
    keys = ApiKeys(store, "p", ["p", "big"], namespace=ns)
    secret, made = keys.create("hal", tags=["t=a", "env=x"])
    assert made.tags == ("env=x", "t=a") and keys.authenticate(secret) == made
    assert keys.list("hal")[0].tags == ("env=x", "t=a")
    pol = parse_policy({
        "plans": {"p": {"burst": 3, "refill_per_second": 0.001},
                  "big": {"burst": 1000, "refill_per_second": 1000}},
        "defaults": {"plan": "p"}, "tags": {"t=a": {"quotas": ["2 per day"]}},
        "models": {MODEL: {"provider": "openai", "input_usd_per_million": 1,
                           "output_usd_per_million": 2}}})
    engine = Engine(store, pol, namespace=ns)
    p = pol.plans["p"]
    assert engine.acquire("ann", plan=p, tags=["t=a"]).allowed
    assert engine.acquire("ben", plan=p, tags=["t=a", "env=x"]).allowed
    refused = engine.acquire("ben", plan=p, tags=["t=a"])
    assert refused.refused is not None and refused.refused.layer.name == "tag:t=a/quota-day"
    assert next(s.remaining for s in engine.peek("ben", p).states if s.layer.name == "user") == 2
    assert engine.acquire("ben", plan=p, tags=["env=x"]).allowed   # no table: no limit
    ask = Ask(MODEL, pol.models[MODEL], 100, 100, key_id="kid")
    with engine.reserve("cy", pol.plans["big"], ask, tags=["env=x"]) as reservation:
        reservation.settle(Usage(100, 25))
    ledger = Ledger(store, ns)
    day = ledger.today()
    assert ledger.tag_totals("env=x", [day])[0].usd_micros == 150
    assert [(row.user, row.score) for row in ledger.top(day, 5, tag="env=x")] == [("cy", 150)]
    assert ledger.top(day, 5, tag="t=a") == []


def test_the_audit_trail_appends_and_reads_back(store: Store, ns: str) -> None:
    start = datetime.now(UTC) - timedelta(seconds=5)
    for i in range(5):
        record(store, "shell:test", "limits.set", f"u:user{i}", {"plan": "p"},
               {"plan": "big"}, namespace=ns)
    record(store, "shell:test", "keys.create", "bad\ud800id", None, "x", namespace=ns)
    entries = Audit(store, ns).read(start)
    assert [e.subject for e in entries] == [f"u:user{i}" for i in range(5)] + ["bad\\ud800id"]
    assert entries[0].before == '{"plan":"p"}' and entries[0].actor == "shell:test"
    assert [e.subject for e in Audit(store, ns).read(start, limit=2)] == [
        "u:user4", "bad\\ud800id"]
    later = datetime.now(UTC) + timedelta(minutes=5)
    assert Audit(store, ns).read(later) == []
    assert MAX_ENTRIES >= 1000


def test_the_narrow_methods(store: Store, ns: str) -> None:
    """What the features above rely on, method by method, as Redis answers it."""
    h, other = ns + "h", ns + "other"
    assert store.hashes([h, other]) == [{}, {}] and store.record(h) == {}
    assert store.hash_fields(h, ["a", "b"]) == [None, None]
    store.hash_set(h, {"a": "1", "é": "ü"})
    assert store.record(h) == {"a": "1", "é": "ü"} == store.hashes([h])[0]
    assert store.hash_claim(h, "b", "x") and not store.hash_claim(h, "b", "y")
    assert store.hash_fields(h, ["b", "c"]) == ["x", None]
    assert store.hash_add(h, "n", 2) == 2 and store.hash_add(h, "n", 3) == 5
    assert store.hash_fields(h, ["n"]) == ["5"]
    for field in ("a", "é", "b", "n"):
        assert store.hash_delete(h, field)
    assert not store.hash_delete(h, "a") and store.hashes([h]) == [{}]
    assert store.ranking(ns + "rank", 5) == []
    assert store.claim(ns + "marker") and not store.claim(ns + "marker")
    assert store.log_since(ns + "log", 0, 10) == []
    for i in range(3):
        store.log_append(ns + "log", {"i": str(i)}, 100)
    rows = store.log_since(ns + "log", 0, 2)
    assert [f for _, f in rows] == [{"i": "1"}, {"i": "2"}]
    assert rows[0][0] <= rows[1][0] and abs(rows[1][0] / 1000 - store.now()) < 60
    assert store.delete([h, ns + "marker", ns + "log"]) == 2
