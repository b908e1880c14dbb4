"""The spend ledger on a clock the test sets: the shipped settle.lua on real Valkey and
memory:// book the same days, roll over at UTC midnight, expire after history_days, and rank
the top N exactly. Plus bytes per active user per day, by MEMORY USAGE."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import redis

from limiting.core.codec import SettleCall
from limiting.ledger import Ledger, LedgerKeys, Spend, Spender, day_of, parse_day
from limiting.stores.store import RedisStore
from tests.clocked import ClockedMemory, ClockedValkey

Backend = ClockedMemory | ClockedValkey
MIDNIGHT = int(datetime(2026, 3, 1, tzinfo=UTC).timestamp()) * 10**6
KEYS = LedgerKeys("rl:")


@pytest.fixture(params=["memory", "valkey"])
def backend(request: pytest.FixtureRequest, redis_url: str) -> Iterator[Backend]:
    if request.param == "memory":
        yield ClockedMemory()
        return
    client = redis.Redis.from_url(redis_url)
    yield ClockedValkey(client)
    client.flushdb()
    client.close()


def reader(b: Backend) -> Ledger:
    if isinstance(b, ClockedValkey):
        b._expire_now()   # replay expiry on the fake clock before reading
        return Ledger(RedisStore("redis://", b.client))
    return Ledger(b)


def book(b: Backend, who: Spender, at: int, counts: tuple[int, int, int, int, int]) -> None:
    """One settle as Reservation sends it on one server: the ledger in the same call."""
    b.now_us = at
    call = SettleCall(at)
    who.book(at, counts, call, call)
    b.settle(call.keys, call.args)


def spender(user: str, model: str = "gpt-4o", key_id: str | None = "k1", days: int = 3
            ) -> Spender:
    return Spender(KEYS, user, "u", "pro", model, key_id, days)


def test_a_day_holds_what_was_booked_and_rolls_over_at_utc_midnight(backend: Backend) -> None:
    alice = spender("alice")
    book(backend, alice, MIDNIGHT - 1, (10, 2, 5, 300, 1))        # 23:59:59.999999 UTC
    book(backend, alice, MIDNIGHT, (1, 0, 1, 7, 1))                # 00:00:00 the next day
    book(backend, alice, MIDNIGHT + 3_600 * 10**6, (1, 0, 1, 7, 1))
    led = reader(backend)
    today = day_of(MIDNIGHT)
    assert today == parse_day("2026-03-01")
    before, after = led.history("alice", "u", [today - 1, today])
    assert before == Spend(today - 1, 10, 2, 5, 300, 1)
    assert after == Spend(today, 2, 0, 2, 14, 2)
    assert led.history("alice", "u", [today], key_id="k1") == [after]
    assert led.totals([today - 1, today]) == [before, after]
    assert led.models(today, ["gpt-4o", "claude"]) == {"gpt-4o": after}
    # The key user and the /chat user_id of the same name never share a ledger.
    assert led.history("alice", "b", [today]) == [Spend(today)]


def test_history_keys_expire_after_history_days(backend: Backend) -> None:
    bob = spender("bob", days=2)
    book(backend, bob, MIDNIGHT + 60 * 10**6, (1, 0, 1, 1, 1))
    day = day_of(MIDNIGHT)
    for later, kept in ((2, True), (3, False)):
        backend.now_us = MIDNIGHT + later * 86_400 * 10**6 + 1
        spend = reader(backend).history("bob", "u", [day])[0]
        assert (spend.requests == 1) is kept, f"day +{later}"
        assert bool(reader(backend).top(day, 5)) is kept


def test_the_top_list_is_exact_for_the_top_n(backend: Backend) -> None:
    rng = random.Random(7)
    usd: Counter[str] = Counter()
    tokens: Counter[str] = Counter()
    for i in range(300):
        user = f"user{rng.randrange(40)}"
        model = rng.choice(["gpt-4o", "claude"])
        counts = (rng.randrange(50), rng.randrange(5), rng.randrange(50), rng.randrange(999), 1)
        book(backend, spender(user, model), MIDNIGHT + i * 10**6, counts)
        usd[user] += counts[3]
        tokens[user] += counts[0] + counts[1] + counts[2]
    led, day = reader(backend), day_of(MIDNIGHT)
    top = led.top(day, 10)
    want = sorted(usd.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:10]
    assert [(row.user, row.score) for row in top] == want
    assert all(row.spend.usd_micros == row.score for row in top)
    by_tokens = led.top(day, 5, by="tok")
    assert [(r.user, r.score) for r in by_tokens] == sorted(
        tokens.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:5]
    total = led.totals([day])[0]
    assert total.usd_micros == sum(usd.values()) and total.requests == 300
    per_model = led.models(day, ["gpt-4o", "claude"])
    assert sum(s.usd_micros for s in per_model.values()) == total.usd_micros
    assert sum(r.score for r in led.top(day, 100, model="claude")) == per_model[
        "claude"].usd_micros


def test_a_wrong_type_key_changes_nothing(r: redis.Redis) -> None:
    b = ClockedValkey(r, now_us=MIDNIGHT)
    r.set(KEYS.total(day_of(MIDNIGHT)), "x")
    call = SettleCall(MIDNIGHT)
    spender("carol").book(MIDNIGHT, (1, 1, 1, 1, 1), call, call)
    with pytest.raises(redis.ResponseError, match="not a spend ledger"):
        b.settle(call.keys, call.args)
    assert not r.exists(KEYS.user("carol", "u", day_of(MIDNIGHT)))


def test_bytes_per_active_user_per_day(r: redis.Redis) -> None:
    """What one more user active for a day costs: their hash and key hash, and their
    members in the day's rankings (printed; the README states it)."""
    b = ClockedValkey(r, now_us=MIDNIGHT)
    day = day_of(MIDNIGHT)

    def used() -> int:
        return sum(r.memory_usage(k) or 0 for k in r.scan_iter("rl:*"))

    for i in range(50):
        book(b, spender(f"warm-user-{i:04d}", key_id=f"key{i:09d}"), MIDNIGHT + i,
             (1200, 300, 450, 12_345, 3))
    before = used()
    n = 200
    for i in range(n):
        book(b, spender(f"user-{i:04d}", key_id=f"kid{i:09d}"), MIDNIGHT + i,
             (1200, 300, 450, 12_345, 3))
    per_user = (used() - before) / n
    print(f"\nledger: {per_user:.0f} bytes per active user per day "
          f"(user hash, key hash, 3 ranking entries)")
    assert KEYS.rank(day) and 100 < per_user < 1000


def test_any_user_id_is_ranked_and_read_back_as_it_came(backend: Backend) -> None:
    """A /chat user_id is the client's text: a lone surrogate cannot travel as UTF-8, and a
    colon or a quote must not split the ranking's member."""
    odd = ["\ud800", "ünï ☃", 'a:"b"', ""]
    for i, user in enumerate(odd):
        book(backend, spender(user), MIDNIGHT + i, (1, 0, 1, 10 + i, 1))
    top = reader(backend).top(day_of(MIDNIGHT), 10)
    assert [(row.user, row.score, row.spend.usd_micros) for row in top] == [
        (user, 10 + i, 10 + i) for i, user in reversed(list(enumerate(odd)))]


def test_a_ranking_member_written_before_ids_were_quoted_still_reads() -> None:
    from limiting.ledger import from_member, member

    assert from_member(member("alice", "u")) == ("u", "alice")
    assert from_member(member('"quoted" \ud800', "b")) == ("b", '"quoted" \ud800')
    assert from_member("u:alice") == ("u", "alice")        # as days before the change hold
    assert from_member("b:42") == ("b", "42")
