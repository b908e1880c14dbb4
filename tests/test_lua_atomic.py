"""acquire.lua and settle.lua are all or nothing, even over a damaged key.

Each test damages one key of a request (a wrong type, a value of the wrong length, garbage
in the pace hash) and runs the script against real Valkey: it either answers, having applied
what its answer says, or errors with every key exactly as it was (DUMP before and after).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
import redis

from limiting.stores.storage import open_store
from limiting.stores.store import Store, StoreUnavailable
from tests.clocked import decode_window

EDGE, BUCKET, WIN, TOKENS, LEASES, PACE = ("LIMITS:edge/1.2.3.4", "{u}:b", "{u}:w", "{u}:W",
                                           "{u}:c", "{m}:pace")
KEYS = [EDGE, BUCKET, WIN, TOKENS, LEASES, PACE]
USER_KEYS = [BUCKET, WIN, TOKENS, LEASES]


def acquire_args(lease: str) -> list[str]:
    return ["f", "100", "10", "1",               # edge: 100 per 10 s
            "b", "10", "1", "1",                 # bucket: 10, 1 per second
            "w", "100", "60000000", "1",         # requests per minute
            "W", "100000", "60000000", "50",     # tokens per minute
            "c", "5", "30000000", lease,         # 5 in flight, 30 s leases
            "p", "0", "0", "50"]                 # the provider's pacing


def settle_args(at: int) -> list[str | int]:
    return [at, "b", "10", "-1", "w", "60000000", "-1", "W", "60000000", "-20",
            "c", "30000000", "L1"]


def snapshot(r: redis.Redis) -> dict[str, bytes | None]:
    return {key: r.dump(key) for key in KEYS}


def _pace(r: redis.Redis) -> None:
    sec, usec = r.time()
    now = sec * 1_000_000 + usec
    r.hset(PACE, mapping={"rl": 50, "rr": now + 60_000_000, "tl": 10_000,
                          "tr": now + 60_000_000})


def _prepared(r: redis.Redis, store: Store) -> int:
    """Every key holds sound state after one admitted request; returns its now_us."""
    _pace(r)
    reply = store.acquire(KEYS, acquire_args("L1"))
    assert reply[0] == 1, reply
    assert all(r.exists(key) for key in KEYS)
    return int(reply[3])


def _as_hash(key: str) -> Callable[[redis.Redis], None]:
    def damage(r: redis.Redis) -> None:
        r.delete(key)
        r.hset(key, "x", "1")
    return damage


def _as_list(key: str) -> Callable[[redis.Redis], None]:
    def damage(r: redis.Redis) -> None:
        r.delete(key)
        r.rpush(key, "x")
    return damage


def _as_string(key: str, value: bytes) -> Callable[[redis.Redis], None]:
    def damage(r: redis.Redis) -> None:
        r.delete(key)
        r.set(key, value, px=120_000)   # as the scripts write them: with a TTL
    return damage


def _pace_field(field: str, value: str) -> Callable[[redis.Redis], None]:
    def damage(r: redis.Redis) -> None:
        r.hset(PACE, field, value)
    return damage


NAN_BUCKET = struct.pack("<dd", float("nan"), 0.0)
DAMAGE = {
    "edge as a hash": _as_hash(EDGE),
    "edge not a count": _as_string(EDGE, b"abc"),
    "edge a float": _as_string(EDGE, b"1.5"),
    "bucket of the wrong length": _as_string(BUCKET, b"xyz"),
    "bucket holding nan": _as_string(BUCKET, NAN_BUCKET),
    "bucket as a list": _as_list(BUCKET),
    "quota window of the wrong length": _as_string(WIN, b"\0" * 20),
    "token window of the wrong length": _as_string(TOKENS, b"\0" * 260),
    "token window as a hash": _as_hash(TOKENS),
    "lease key as a string": _as_string(LEASES, b"L9"),
    "pace hash as a string": _as_string(PACE, b"x"),
    "pace rl garbage": _pace_field("rl", "abc"),
    "pace tl garbage": _pace_field("tl", "x"),
    "pace until nan": _pace_field("until", "nan"),
    "pace rr inf": _pace_field("rr", "inf"),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_acquire_over_a_damaged_key_applies_all_or_nothing(r: redis.Redis, redis_url: str,
                                                          name: str) -> None:
    store = open_store(redis_url, timeout=2)
    _prepared(r, store)
    DAMAGE[name](r)
    before = snapshot(r)
    try:
        reply = store.acquire(KEYS, acquire_args("L2"))
    except StoreUnavailable:
        assert snapshot(r) == before, "an error left some key changed"
        return
    after = snapshot(r)
    changed = {key for key in KEYS if after[key] != before[key]}
    if reply[0] == 1:
        # Admitted: every layer of the user took its charge (the pace hash may or may not).
        assert {EDGE, *USER_KEYS} <= changed, (reply, changed)
    else:
        # Refused: only the edge counts the attempt.
        assert changed <= {EDGE}, (reply, changed)


@pytest.mark.parametrize("name", [n for n in DAMAGE if "pace" in n])
def test_pace_garbage_is_unknown_not_an_error(r: redis.Redis, redis_url: str, name: str) -> None:
    store = open_store(redis_url, timeout=2)
    _prepared(r, store)
    DAMAGE[name](r)
    if name == "pace hash as a string":
        with pytest.raises(StoreUnavailable):
            store.acquire(KEYS, acquire_args("L2"))
        return
    assert store.acquire(KEYS, acquire_args("L2"))[0] == 1


SETTLE_DAMAGE = {
    "bucket of the wrong length": _as_string(BUCKET, b"xyz"),
    "bucket as a list": _as_list(BUCKET),
    "bucket holding nan": _as_string(BUCKET, NAN_BUCKET),
    "quota window of the wrong length": _as_string(WIN, b"\0" * 20),
    "token window of the wrong length": _as_string(TOKENS, b"\0" * 260),
    "token window as a list": _as_list(TOKENS),
    "lease key as a string": _as_string(LEASES, b"L9"),
}


@pytest.mark.parametrize("name", list(SETTLE_DAMAGE))
def test_settle_over_a_damaged_key_changes_nothing(r: redis.Redis, redis_url: str,
                                                   name: str) -> None:
    store = open_store(redis_url, timeout=2)
    at = _prepared(r, store)
    SETTLE_DAMAGE[name](r)
    before = snapshot(r)
    with pytest.raises(StoreUnavailable):
        store.run("settle", USER_KEYS, settle_args(at))
    assert snapshot(r) == before


def test_settle_of_sound_keys_applies_every_layer(r: redis.Redis, redis_url: str) -> None:
    store = open_store(redis_url, timeout=2)
    at = _prepared(r, store)
    before = snapshot(r)
    assert store.run("settle", USER_KEYS, settle_args(at)) == 4
    after = snapshot(r)
    assert all(after[key] != before[key] for key in (BUCKET, WIN, TOKENS))
    assert r.zcard(LEASES) == 0


def test_a_refund_below_zero_is_clamped(r: redis.Redis, redis_url: str) -> None:
    store = open_store(redis_url, timeout=2)
    at = _prepared(r, store)
    store.run("settle", [TOKENS], [at, "W", "60000000", "-1000000"])
    _last, total, _ring = decode_window(r.get(TOKENS), wide=True)
    assert total == 0


def test_observe_over_a_damaged_pace_key_writes_nothing(r: redis.Redis, redis_url: str) -> None:
    store = open_store(redis_url, timeout=2)
    r.set(PACE, "x")
    with pytest.raises(StoreUnavailable):
        store.run("observe", [PACE], ["5", "1000000", "5", "1000000", "1000000"])
    assert r.get(PACE) == b"x"
