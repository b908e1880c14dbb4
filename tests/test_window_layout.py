"""The sliding window's stored layout: counters as wide as the limit needs, and the layout
before it still read (a deploy keeps every user's counts); the lease layer's one read.

Day windows (slots of 24 minutes) keep every charge of a test in one slot; each answer is
compared with memory://, which keeps no bytes, so a width that lost a count would show.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
import redis

from limiting.stores.memory import MemoryStore
from limiting.stores.storage import open_store
from limiting.stores.store import Store, StoreUnavailable
from tests.clocked import SLOTS, decode_window, window_tail

DAY_US = 86_400_000_000
KEY = "{u:layout}:q"


@pytest.fixture
def lua(r: redis.Redis, redis_url: str) -> Iterator[Store]:
    store = open_store(redis_url, timeout=2)
    yield store
    store.close()


def window(kind: str, limit: int, cost: int) -> list[str]:
    return [kind, str(limit), str(DAY_US), str(cost)]


def both(lua: Store, memory: MemoryStore, args: list[str]) -> list[int]:
    """One acquire on Lua and memory://: the same answer, its times told as moments (each
    store has its own clock)."""
    got, want = lua.acquire([KEY], args), memory.acquire([KEY], args)

    def moments(reply: list[int]) -> list[int]:
        now = reply[3]
        return [reply[0], reply[1], reply[2] and reply[2] + now, reply[4],
                reply[5] and reply[5] + now]

    a, b = moments(got), moments(want)
    assert a[:2] == b[:2] and a[3] == b[3], (got, want)
    assert abs(a[2] - b[2]) <= 1 and abs(a[4] - b[4]) <= 1, (got, want)
    return got


def width_of(raw: bytes) -> int:
    assert len(raw) % 2 == 1, len(raw)
    assert len(raw) == 9 + 62 * raw[0] + 16 * len(window_tail(raw)), len(raw)
    return raw[0]


@pytest.mark.parametrize(("limit", "width"), [(100, 1), (255, 1), (256, 2), (65535, 2),
                                              (65536, 3), (2**32 - 1, 4), (2**32, 5)])
@pytest.mark.parametrize("kind", ["w", "W"])
def test_counters_are_as_wide_as_the_limit_needs(r: redis.Redis, lua: Store, kind: str,
                                                 limit: int, width: int) -> None:
    memory = MemoryStore()
    both(lua, memory, window(kind, limit, limit - 1))   # the counter at the limit's edge
    assert width_of(r.get(KEY)) == width
    admitted = both(lua, memory, window(kind, limit, 1))
    assert admitted[:3] == [1, 0, 0] and admitted[4] == 0
    refused = both(lua, memory, window(kind, limit, 1))
    assert refused[:2] == [0, 1] and refused[4] == 0
    _last, total, ring = decode_window(r.get(KEY), wide=kind == "W")
    assert total == limit and sum(ring) == limit


def test_a_settle_beyond_the_width_widens_and_loses_nothing(r: redis.Redis,
                                                            lua: Store) -> None:
    """Tokens reserved at 100 and billed at 1,000 under a 200-wide limit: the counter no
    longer fits a byte, so the ring grows to 2 bytes (the layout before clamped at 4)."""
    memory = MemoryStore()
    at = both(lua, memory, window("W", 200, 100))[3]
    assert width_of(r.get(KEY)) == 1
    settle = [at, "W", str(DAY_US), "900"]
    lua.run("settle", [KEY], settle)
    memory.run("settle", [KEY], settle)
    assert width_of(r.get(KEY)) == 2
    _last, total, ring = decode_window(r.get(KEY), wide=True)
    assert total == 1000 and sum(ring) == 1000
    over = both(lua, memory, window("W", 200, 1))
    assert over[:2] == [0, 1]
    # A refund back under the limit keeps the width (a settle never narrows); the next write
    # narrows it to what the limit needs.
    lua.run("settle", [KEY], [at, "W", str(DAY_US), "-950"])
    memory.run("settle", [KEY], [at, "W", str(DAY_US), "-950"])
    assert width_of(r.get(KEY)) == 2
    assert both(lua, memory, window("W", 200, 1))[4] == 149
    assert width_of(r.get(KEY)) == 1


def test_a_changed_limit_reencodes_the_ring_and_keeps_its_counts(r: redis.Redis,
                                                                 lua: Store) -> None:
    memory = MemoryStore()
    both(lua, memory, window("w", 100_000, 50))
    assert width_of(r.get(KEY)) == 3
    assert both(lua, memory, window("w", 100, 1))[4] == 49       # a reload lowered it
    assert width_of(r.get(KEY)) == 1
    assert both(lua, memory, window("w", 1000, 1))[4] == 948     # and raised it again
    assert width_of(r.get(KEY)) == 2
    assert decode_window(r.get(KEY), wide=False)[1] == 52


def _old_layout(r: redis.Redis, wide: bool, counts: dict[int, int],
                tail: dict[int, int]) -> int:
    """A window as the layout before this one stored it: {last, total} as doubles, 61
    counters of 4 bytes ("w") or doubles ("W"), then {slot, count} pairs. Returns its slot."""
    sec, usec = r.time()
    cur = (sec * 1_000_000 + usec) // (DAY_US // 60)
    ring = [0] * SLOTS
    for ago, n in counts.items():
        ring[(cur - ago) % SLOTS] = n
    fmt = "d" if wide else "I"
    raw = struct.pack("<dd", cur, sum(counts.values())) + struct.pack(f"<{SLOTS}{fmt}", *ring)
    for ahead, n in sorted(tail.items()):
        raw += struct.pack("<d" + fmt, cur + ahead, n)
    r.set(KEY, raw, px=DAY_US // 1000)
    return cur


@pytest.mark.parametrize("kind", ["w", "W"])
def test_a_window_in_the_layout_before_is_read_then_rewritten(r: redis.Redis, lua: Store,
                                                              kind: str) -> None:
    """What a deploy finds: counts written by the scripts before it. A look reads them and
    changes nothing; the first charge keeps every count (the waiter's too) in the new
    layout."""
    cur = _old_layout(r, kind == "W", {0: 7, 5: 20, 60: 3}, {2: 4})
    before = r.get(KEY)
    look = lua.acquire([KEY], window(kind, 100, 0))
    assert look[4] == 100 - 30 - 4 and r.get(KEY) == before
    assert lua.acquire([KEY], window(kind, 100, 1))[4] == 100 - 31 - 4
    raw = r.get(KEY)
    assert width_of(raw) == 1
    last, total, ring = decode_window(raw, wide=kind == "W")
    assert (last, total) == (cur, 31)
    assert (ring[cur % SLOTS], ring[(cur - 5) % SLOTS], ring[(cur - 60) % SLOTS]) == (8, 20, 3)
    assert window_tail(raw) == {cur + 2: 4}


def test_a_settle_converts_a_window_in_the_layout_before(r: redis.Redis, lua: Store) -> None:
    cur = _old_layout(r, False, {0: 7, 1: 2}, {})
    at = cur * (DAY_US // 60)
    assert lua.run("settle", [KEY], [at, "w", str(DAY_US), "-1"]) == 1
    last, total, ring = decode_window(r.get(KEY), wide=False)
    # The new layout, at the width it had: a settle does not know the limit.
    assert width_of(r.get(KEY)) == 4 and (last, total) == (cur, 8)
    assert (ring[cur % SLOTS], ring[(cur - 1) % SLOTS]) == (6, 2)
    assert lua.acquire([KEY], window("w", 100, 1))[4] == 91
    assert width_of(r.get(KEY)) == 1 and decode_window(r.get(KEY), wide=False)[1] == 9


@pytest.mark.parametrize("raw", [
    bytes([7]) + b"\0" * (9 + 62 * 7 - 1),        # width 7: not one acquire.lua writes
    bytes([1]) + b"\0" * 68,                       # odd, too short for its ring
    bytes([1]) + b"\0" * 70 + b"\0" * 16,          # a tail entry that is not after the ring
])
def test_a_damaged_window_is_refused_and_left_alone(r: redis.Redis, lua: Store,
                                                    raw: bytes) -> None:
    r.set(KEY, raw)
    with pytest.raises(StoreUnavailable):
        lua.acquire([KEY], window("w", 100, 1))
    assert r.get(KEY) == raw


def test_a_users_layers_fit_their_memory_goals(r: redis.Redis, redis_url: str) -> None:
    """Issue 20: a bucket + "100 per day" window in at most 256 bytes by MEMORY USAGE, every
    layer of an LLM plan (bucket, quotas, tokens, dollars, a lease held) in at most 1 KiB."""
    from bench.memory import layer_sizes

    sizes = layer_sizes(redis_url)
    assert set(sizes["starter"]) == {"b", "q86400"}, sizes
    assert sum(sizes["starter"].values()) <= 256, sizes
    assert {"b", "q86400", "qmonth", "t60", "usd86400", "cc"} <= set(sizes["llm"]), sizes
    assert sum(sizes["llm"].values()) <= 1024, sizes


# ----------------------------------------------------------------------------------------
# Leases: one read of the first limit + 8 of them; the exact count when that page is full


LEASES = "{u:layout}:cc"


@pytest.mark.parametrize(("limit", "stale"), [(2, 0), (2, 3), (2, 10), (2, 40), (100, 5)])
def test_leases_read_in_one_page_or_counted_exactly(r: redis.Redis, lua: Store, limit: int,
                                                    stale: int) -> None:
    """Stale leases (past their TTL) never count, whether the page holds them all or not;
    the admitted call sweeps them; a full limit refuses until the soonest lease runs out."""
    sec, usec = r.time()
    now = sec * 1_000_000 + usec
    old = {f"old-{k}": now - 1_000_000 - k for k in range(stale)}
    r.zadd(LEASES, {**old, "live-0": now + 30_000_000})
    args = ["c", str(limit), "60000000"]
    first = lua.acquire([LEASES], [*args, "new-1"])
    assert first[:3] == [1, 0, 0] and first[4] == limit - 2, first
    assert r.zcard(LEASES) == 2     # swept: the live one and the new one
    assert 29_000_000 < first[5] <= 30_000_000
    if limit == 2:
        full = lua.acquire([LEASES], [*args, "new-2"])
        assert full[:2] == [0, 1] and full[4] == 0
        assert 29_000_000 < full[2] <= 30_000_000
        look = lua.acquire([LEASES], [*args, "-"])
        assert look[:2] == [1, 0] and look[4] == 0
        shadow = lua.acquire([LEASES], ["c?", str(limit), "60000000", "new-3"])
        assert shadow[:2] == [1, 0] and shadow[4] == -1
        assert r.zcard(LEASES) == 2
