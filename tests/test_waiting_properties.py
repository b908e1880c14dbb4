"""Property tests for waiting clients: the acquire script and memory:// admit a request into
its future slot when the wait fits its deadline, and nothing is ever admitted faster than
the rate (tests/test_properties.py's machinery: a controlled clock, memory:// and the real
Lua on Valkey alike).

Each admission is logged at the moment it runs (the call's time plus the wait it was
given); the exact references then check every window of a quota's length, and every
interval of the bucket, over those run times: waits included, no more than the limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import pytest
import redis
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from limiting.core.codec import layer_args, with_deadline
from limiting.core.layers import compile_plan
from limiting.core.policy import Plan
from tests.clocked import SLOTS, ClockedMemory, ClockedValkey, window_tail
from tests.test_properties import (
    EPS,
    PREFIX,
    START,
    TWO_WINDOWS,
    Backend,
    Clocked,
    SlidingLog,
    bucket_and_windows,
    machine_settings,
    make_backend,
    with_costs,
)

__all__ = ["make_backend"]   # the fixture, used by name


class WaitingMachine(Clocked):
    """A bucket and two windows; each request asks for a deadline of its own."""

    @initialize(burst=st.integers(1, 4), rate=st.sampled_from([0.5, 1.0, 4.0]),
                quotas=TWO_WINDOWS, start=START)
    def setup(self, burst: int, rate: float, quotas: list[tuple[int, int]], start: int) -> None:
        plan = bucket_and_windows(burst, rate, quotas)
        self.compiled = compile_plan(plan)
        self.keys = [PREFIX + s for s in self.compiled.suffixes]
        self.burst, self.rate = burst, Fraction(rate)
        self.logs = [SlidingLog(n, s * 10**6) for n, s in quotas]
        self.unit_us = min(s for _, s in quotas) * 1e6 / 60
        self.length_us = max(s for _, s in quotas) * 10**6
        self.runs: list[int] = []          # run times of admitted requests (cost 1 each)
        self.b.now_us = start

    @rule(deadline_s=st.sampled_from([0, 0.1, 0.5, 1, 3, 30]), n=st.integers(1, 4))
    def requests(self, deadline_s: float, n: int) -> None:
        """``n`` clients arriving at once, each willing to wait ``deadline_s``."""
        deadline = round(deadline_s * 1e6)
        args = with_deadline(with_costs(self.compiled, {}), deadline)
        for _ in range(n):
            t = self.now
            reply = self.b.acquire(self.keys, args)
            if reply[0] == 1:
                assert 0 <= reply[2] <= deadline
                run = t + reply[2]
                # Arrival order is the order of service.
                assert not self.runs or run >= self.runs[-1] or reply[2] == 0
                self.runs.append(run)
                for log in self.logs:
                    log.add(run, 1)
                self.check(run)
            else:
                assert reply[2] == -1 or reply[2] > deadline, (reply[2], deadline)
                if reply[2] > 0:
                    # Retry-After is honest: a client as patient as the wait passes.
                    patient = with_deadline(with_costs(self.compiled, {}), reply[2])
                    assert self.probe(t, self.keys, patient)[0] == 1

    def check(self, run: int) -> None:
        for log in self.logs:
            # No window of the quota's length, ending at any run, holds more than its limit.
            for end in sorted(t for t, _ in log.entries):
                assert log.used(end) <= log.limit, (log.limit, log.length)
        # The bucket: in any interval of run times, at most burst + rate * its length.
        runs = sorted(self.runs)
        for i, t0 in enumerate(runs):
            for j in range(i, len(runs)):
                units = j - i + 1
                assert units <= self.burst + self.rate * (runs[j] - t0) / 10**6 + EPS, (
                    units, runs[j] - t0)


@pytest.mark.slow
def test_waiting_clients_never_beat_the_rate(make_backend: Callable[[], Backend]) -> None:
    run_state_machine_as_test(lambda: WaitingMachine(make_backend()),
                              settings=machine_settings(80))


def test_no_deadline_is_todays_call(make_backend: Callable[[], Backend]) -> None:
    """A deadline of 0 sends the same arguments as before: nothing waits."""
    compiled = compile_plan(Plan("p", burst=1, refill_per_second=1.0))
    args = with_costs(compiled, {})
    assert list(with_deadline(args, 0)) == args
    b = make_backend()
    b.now_us = 1_700_000_000_000_000
    keys = [PREFIX + s for s in compiled.suffixes]
    assert b.acquire(keys, args)[0] == 1
    refused = b.acquire(keys, args)
    assert refused[0] == 0 and refused[2] > 0


def test_eight_waiters_are_spaced_by_the_rate(make_backend: Callable[[], Backend]) -> None:
    """burst 1, 4 per second, 3 s deadline: 13 admitted (1 + 3 s x 4), 250 ms apart; the
    rest refused with the wait the queue's end gives."""
    compiled = compile_plan(Plan("p", burst=1, refill_per_second=4.0))
    b = make_backend()
    b.now_us = 1_700_000_000_000_000
    keys = [PREFIX + s for s in compiled.suffixes]
    args = with_deadline(with_costs(compiled, {}), 3_000_000)
    replies = [b.acquire(keys, args) for _ in range(24)]
    admitted = [r[2] for r in replies if r[0] == 1]
    assert len(admitted) == 13
    assert all(abs(w - 250_000 * k) <= 2 * k + 1 for k, w in enumerate(admitted)), admitted
    refused = [r[2] for r in replies if r[0] == 0]
    assert all(3_000_000 < w <= 3_250_000 + 2 * 24 for w in refused), refused


def test_max_wait_seconds_is_checked_with_file_key_and_reason() -> None:
    import pytest

    from limiting.core.policy import PolicyError, parse_policy

    def plans(value: object) -> dict[str, object]:
        return {"plans": {"p": {"burst": 1, "refill_per_second": 1, "max_wait_seconds": value}}}

    assert parse_policy(plans(2.5)).plans["p"].max_wait_seconds == 2.5
    assert parse_policy({"plans": {"p": {"burst": 1, "refill_per_second": 1}}}
                        ).plans["p"].max_wait_seconds == 0
    for bad in (-1, 301, float("nan"), "3", True):
        with pytest.raises(PolicyError, match=r"limits\.toml: plans\.p\.max_wait_seconds"):
            parse_policy(plans(bad), "limits.toml")
    with pytest.raises(PolicyError, match="max_wait_seconds"):   # orgs do not wait alone
        parse_policy({"plans": {"p": {"burst": 1, "refill_per_second": 1}},
                      "orgs": {"o": {"quotas": ["5 per day"], "max_wait_seconds": 1}}},
                     "limits.toml")



# ----------------------------------------------------------------------------------------
# A window shared with others: a waiter's charge moves no one else's slot (issue 19, item 1)


def _tail(backend: Backend, key: str) -> dict[int, float]:
    """The waiters' charges a window holds ahead of its ring: slot -> count."""
    if isinstance(backend, ClockedMemory):
        item = backend._data.get(key)
        return {} if item is None or item[0] <= backend.now_us else dict(item[1][4])
    backend._expire_now()
    raw = backend.client.get(key)
    if raw is None:
        return {}
    return {slot: float(count) for slot, count in window_tail(raw).items()}


class SharedWindowMachine(RuleBasedStateMachine):
    """One window shared by a waiting plan (its own bucket of burst 1, a deadline) and two
    plans that never wait (one checked against all of the limit, one against half, as
    ``reserve`` does), on memory:// and the Lua at once, every reply compared. A waiter may
    hang up before its slot (its charges given back as Reservation.refund_everything does).

    The rule: a request that never waits is refused only when some window ending in its slot
    or later, its charges in the slots they run in, has no room; waiters included, no window
    of the limit's length ever holds more than the limit at run times; and a hung-up waiter
    leaves nothing behind in the window's state."""

    def __init__(self, memory: ClockedMemory, valkey: ClockedValkey) -> None:
        super().__init__()
        self.backends: tuple[Backend, Backend] = (memory, valkey)

    @initialize(limit=st.integers(2, 8), seconds=st.sampled_from([1, 2, 10, 60]),
                rate=st.sampled_from([0.05, 0.5, 2.0]), start=START)
    def setup(self, limit: int, seconds: int, rate: float, start: int) -> None:
        self.limit, self.length = limit, seconds * 10**6
        self.slot = self.length / 60
        self.window_key, self.bucket_key = PREFIX + "shared", PREFIX + "own"
        self.rate = rate
        self.runs: dict[int, tuple[int, int, int]] = {}   # id -> (run µs, slot, charged_at)
        self.next_id = 0
        self.log = SlidingLog(limit, self.length)
        for b in self.backends:
            b.now_us = start

    @property
    def now(self) -> int:
        return self.backends[0].now_us

    def call(self, keys: list[str], args: list[bytes]) -> list[int]:
        mem, lua = (b.acquire(keys, args) for b in self.backends)
        assert mem == lua
        return mem

    def used(self, x: int) -> int:
        """Charges in the 61 slots of the window ending in slot ``x``."""
        return sum(1 for _, s, _ in self.runs.values() if x - SLOTS < s <= x)

    def room_from(self, first: int, limit: int) -> bool:
        """Every window ending in slot ``first`` or later has room for one more."""
        top = max([first, *(s for _, s, _ in self.runs.values())]) + SLOTS
        return all(self.used(x) + 1 <= limit for x in range(first, top))

    def admit(self, run: int, charged_at: int) -> None:
        self.runs[self.next_id] = (run, math.floor(charged_at / self.slot), charged_at)
        self.next_id += 1
        self.log.add(run, 1)
        for end in sorted(t for t, _ in self.log.entries):   # waits included, never more
            assert self.log.used(end) <= self.limit

    @rule(n=st.integers(0, 30), unit=st.sampled_from([1, 10**5, 10**6, 10 * 10**6]))
    def advance(self, n: int, unit: int) -> None:
        for b in self.backends:
            b.now_us += n * unit

    @rule(deadline_s=st.sampled_from([1, 5, 30, 120]))
    def waiter(self, deadline_s: float) -> None:
        args = [*layer_args("b", 1, self.rate, "1"), *layer_args("w", self.limit, self.length, "1")]
        reply = self.call([self.bucket_key, self.window_key],
                          list(with_deadline(args, deadline_s * 10**6)))
        if reply[0] == 1:
            at = reply[3] + reply[2]
            assert self.room_from(math.floor(at / self.slot), self.limit)
            self.admit(at, at)

    @rule(half=st.booleans())
    def other(self, half: bool) -> None:
        limit = self.limit // 2 if half else self.limit
        reply = self.call([self.window_key], layer_args("w", limit, self.length, "1"))
        now = self.now
        # Held back only by charges that count in a window holding its slot.
        assert (reply[0] == 1) == self.room_from(math.floor(now / self.slot), limit), reply
        if reply[0] == 1:
            assert reply[2] == 0
            self.admit(now, now)

    @rule(pick=st.integers(0, 100))
    def hang_up(self, pick: int) -> None:
        waiting = sorted(i for i, (run, _, _) in self.runs.items() if run > self.now)
        if not waiting:
            return
        i = waiting[pick % len(waiting)]
        run, _, charged_at = self.runs.pop(i)
        if (run, 1) in self.log.entries:   # else pruned: too old to count in any window
            self.log.entries.remove((run, 1))
        for b in self.backends:
            b.settle([self.bucket_key, self.window_key],
                     [charged_at, "b", 1, -1, "w", self.length, -1])

    @invariant()
    def no_trace(self) -> None:
        """The tail holds the waiters still ahead of the ring, and nothing of those gone."""
        if not hasattr(self, "runs"):
            return
        tails = [_tail(b, self.window_key) for b in self.backends]
        assert tails[0] == tails[1]
        for slot, count in tails[0].items():
            assert count == sum(1 for _, s, _ in self.runs.values() if s == slot) > 0


def test_a_waiter_holds_no_one_sharing_its_window(r: redis.Redis) -> None:
    run_state_machine_as_test(lambda: SharedWindowMachine(ClockedMemory(), ClockedValkey(r)),
                              settings=machine_settings(60))
