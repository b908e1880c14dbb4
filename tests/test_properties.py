"""Property-based tests: the acquire algorithms against small exact reference models.

Each property is a hypothesis state machine that runs on memory:// (MemoryStore with a
settable clock) and on the real lua/acquire.lua and lua/settle.lua on the session Valkey
(their clock line alone swapped for a test key, see tests/clocked.py). Keys and arguments
are built by limiting.layers.compile_plan, as the Engine builds them.

Covered: token bucket "b", sliding windows "w"/"W" (a week too), settle, leases "c" (in the
agreement of the two backends), calendar months "m" and shadow layers (section 6). Not here:
the edge window "f" (its expiry is Valkey's own clock, and memory:// never runs it) and
pacing "p" (memory:// learns none).

The reference models are exact logs in integer (or Fraction) arithmetic:
- SlidingLog: every admitted (time, cost); a window of length L ending at t holds the
  entries with t - L < time <= t.
- ExactBucket: capacity and continuous refill in Fractions.
- SlotLog (settle): every reservation with its amount and the 1/60-of-the-window slot it
  was charged to; the window holds the current slot and the 60 before it (slots computed
  as the scripts compute them, see SlotLog.slot).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from limiting.core.alternatives import with_alternatives
from limiting.core.codec import AcquireCall, AcquireReply, SettleCall, layer_args
from limiting.core.decision import from_reply
from limiting.core.headers import rate_limit_headers
from limiting.core.layers import CompiledPlan, compile_plan, window
from limiting.core.naming import user_prefix
from limiting.core.policy import Plan, Window
from limiting.core.windows import MONTH, month_bounds
from limiting.stores.scripts import script_source
from tests.clocked import (
    CLOCK_LINE,
    FAKE_CLOCK_LINE,
    SLOTS,
    ClockedMemory,
    ClockedValkey,
    clocked_source,
)

Backend = ClockedMemory | ClockedValkey

PREFIX = user_prefix("rl:", "prop")
START = st.integers(1_600_000_000_000_000, 1_900_000_000_000_000)   # µs, around today
# Two request windows of different lengths: (limit, seconds) each.
TWO_WINDOWS = st.lists(st.tuples(st.integers(1, 8), st.sampled_from([1, 2, 10, 60])),
                       min_size=2, max_size=2, unique_by=lambda q: q[1])


def bucket_and_windows(burst: int, rate: float, quotas: list[tuple[int, int]]) -> Plan:
    """A plan of a bucket and the given request windows."""
    return Plan("p", burst=burst, refill_per_second=rate,
                quotas=tuple(Window(n, s, f"{n} per {s} seconds") for n, s in quotas))
# (window seconds, wide): "w" is a plan quota; "W" the tokens-minute or usd-day layer.
SHAPES = [(1, False), (2, False), (10, False), (60, False), (86400, False), (604800, False),
          (60, True), (86400, True)]


# Examples per machine and backend: the whole file stays well under a minute on two cores.
EXAMPLES = 120


def machine_settings(examples: int, steps: int = 40) -> settings:
    return settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                    database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(params=["memory", "valkey"])
def make_backend(request: pytest.FixtureRequest) -> Iterator[Callable[[], Backend]]:
    """A fresh, empty backend per hypothesis example."""
    if request.param == "memory":
        yield ClockedMemory
        return
    client: redis.Redis = request.getfixturevalue("r")
    yield lambda: ClockedValkey(client)
    client.flushdb()


@pytest.mark.parametrize("name", ["acquire", "settle"])
def test_clocked_script_is_the_shipped_one_but_its_clock(name: str, r: redis.Redis) -> None:
    shipped, clocked = script_source(name).split("\n"), clocked_source(name).split("\n")
    assert len(shipped) == len(clocked)
    assert [(a, b) for a, b in zip(shipped, clocked, strict=True) if a != b] == [
        (CLOCK_LINE, FAKE_CLOCK_LINE)]
    b = ClockedValkey(r, now_us=1_234_567_890_123_456)
    assert b.acquire([PREFIX + "b"], ["b", "1", "1", "0"])[3] == 1_234_567_890_123_456


def with_costs(compiled: CompiledPlan, costs: dict[int, int | str]) -> list[bytes]:
    """``compiled.args`` with the cost of layer i set, as Engine.reserve sets them."""
    args = list(compiled.args)
    for i, cost in costs.items():
        args[4 * i + 3] = str(cost).encode()
    return args


def remainings(reply: list[int]) -> list[int]:
    return reply[4::2]


def window_plan(limit: int, seconds: int, wide: bool) -> CompiledPlan:
    """A plan whose layer 1 is the window under test; layer 0, its bucket, never binds."""
    free: dict[str, Any] = {"burst": 10**9, "refill_per_second": 1e9}
    if not wide:
        window = Window(limit, seconds, f"{limit} per {seconds} seconds")
        compiled = compile_plan(Plan("p", **free, quotas=(window,)))
    elif seconds == 60:
        compiled = compile_plan(Plan("p", **free, tokens_per_minute=limit), llm=True)
    else:
        compiled = compile_plan(Plan("p", **free, budget_usd_per_day=limit / 1e6), llm=True)
    layer = compiled.layers[1]
    assert (layer.kind, layer.limit, layer.param) == ("W" if wide else "w", limit,
                                                      seconds * 10**6)
    return compiled


# ----------------------------------------------------------------------------------------
# Reference models


class SlidingLog:
    """Exact sliding log of admitted (time µs, cost)."""

    def __init__(self, limit: int, length_us: int) -> None:
        self.limit, self.length = limit, length_us
        self.entries: list[tuple[int, int]] = []

    def add(self, t: int, cost: int) -> None:
        keep = t - 2 * self.length     # older entries count in no window asked about
        self.entries = [e for e in self.entries if e[0] > keep] + [(t, cost)]

    def inside(self, now: int, length: int | None = None) -> list[tuple[int, int]]:
        start = now - (length or self.length)
        return [(t, c) for t, c in self.entries if start < t <= now]

    def used(self, now: int, length: int | None = None) -> int:
        return sum(c for _, c in self.inside(now, length))

    def wait(self, now: int, cost: int) -> int:
        """µs until this log admits ``cost`` (0: now, -1: never)."""
        if cost > self.limit:
            return -1
        need = self.used(now) + cost - self.limit
        if need <= 0:
            return 0
        for t, c in self.inside(now):   # oldest first: it leaves the window first
            need -= c
            if need <= 0:
                return t + self.length - now
        raise AssertionError("unreachable: cost <= limit")


class ExactBucket:
    """Token bucket in exact arithmetic: full at start, refills continuously, capped."""

    def __init__(self, capacity: int, rate: float, now: int) -> None:
        self.capacity, self.rate = Fraction(capacity), Fraction(rate)
        self.tokens, self.at = self.capacity, now

    def level(self, now: int) -> Fraction:
        return min(self.capacity, self.tokens + (now - self.at) * self.rate / 10**6)

    def take(self, now: int, cost: int) -> None:
        self.tokens, self.at = self.level(now) - cost, now


@dataclass
class Held:
    """One admitted reservation, as a test's reference remembers it."""

    at: int
    reserved: int
    amount: int


class SlotLog:
    """Reservations by the slot they were charged to; the window is that slot and 60 more."""

    def __init__(self, length_us: int) -> None:
        self.length = length_us
        self.held: list[Held] = []

    def slot(self, t: int) -> int:
        # The scripts' slot: floor(t / (W / 60)) in doubles. It is not always the exact
        # 60 * t // W: around t = 1.775e15 µs with W = 1 s every exact slot start (each
        # 50,000th µs) falls in the slot before (1775351169300000 / (1e6 / 60) is
        # 106521070157.99998). A 1 µs shift of the slot edges, harmless to every bound the
        # exact log of WindowMachine checks; the settle must match the scripts' slots.
        return math.floor(t / (self.length / 60))

    def alive(self, held: Held, now: int) -> bool:
        return self.slot(now) - self.slot(held.at) < SLOTS

    def total(self, now: int) -> int:
        return sum(h.amount for h in self.held if self.alive(h, now))


# ----------------------------------------------------------------------------------------
# The clock, shared by every machine


class Clocked(RuleBasedStateMachine):
    unit_us: float = 1e6        # the layer's natural step: a slot, a token's refill
    length_us: int = 10**6      # a window, a full refill

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.b = backend

    @property
    def now(self) -> int:
        return self.b.now_us

    @rule(n=st.integers(0, 70), unit=st.sampled_from(["us", "quarter", "unit", "window"]))
    def advance(self, n: int, unit: str) -> None:
        step = {"us": 1, "quarter": self.unit_us / 4, "unit": self.unit_us,
                "window": self.length_us}[unit]
        self.b.now_us += round(n * step)

    @rule(off=st.integers(-2, 2))
    def to_unit_edge(self, off: int) -> None:
        """Just before, on or after the next boundary of a unit (a slot's start)."""
        k = math.floor(self.now / self.unit_us) + 1
        target = math.ceil(k * self.unit_us) + off
        if target > self.now:
            self.b.now_us = target

    def probe(self, at: int, keys: list[str], args: list[bytes]) -> list[int]:
        """What acquire would answer at ``at`` with no other traffic; state is put back."""
        snap, saved = self.b.snapshot(), self.now
        self.b.now_us = at
        try:
            return self.b.acquire(keys, args)
        finally:
            self.b.restore(snap)
            self.b.now_us = saved


# ----------------------------------------------------------------------------------------
# 1. Strict sliding window


class WindowMachine(Clocked):
    @initialize(limit=st.integers(1, 20), shape=st.sampled_from(SHAPES), start=START)
    def setup(self, limit: int, shape: tuple[int, bool], start: int) -> None:
        seconds, wide = shape
        self.compiled = window_plan(limit, seconds, wide)
        self.keys = [PREFIX + s for s in self.compiled.suffixes]
        self.limit, self.length_us = limit, seconds * 10**6
        self.unit_us = self.length_us / 60
        self.slot_ceil = -(-self.length_us // 60)
        self.log = SlidingLog(limit, self.length_us)
        self.b.now_us = start

    @precondition(lambda self: self.log.entries)
    @rule(pick=st.integers(0, 100), slots=st.sampled_from([0, 0.25, 0.5, 0.99, 1, 1.01]),
          off=st.integers(-3, 3))
    def to_window_end(self, pick: int, slots: float, off: int) -> None:
        """Near the time an admission leaves the window: where strictness is decided."""
        t = self.log.entries[pick % len(self.log.entries)][0]
        target = t + self.length_us + round(slots * self.unit_us) + off
        if target > self.now:
            self.b.now_us = target

    @rule(cost=st.integers(1, 3))
    def request(self, cost: int) -> None:
        t, args = self.now, with_costs(self.compiled, {1: cost})
        reply = self.b.acquire(self.keys, args)
        assert reply[3] == t
        if reply[0] == 1:
            self.log.add(t, cost)
            # (a) No window of the quota's length, ending at any admission, holds more.
            assert self.log.used(t) <= self.limit
            # What it reports left is counted over at least the window, at most a slot more.
            longer = self.log.used(t, self.length_us + self.slot_ceil)
            assert self.limit - longer <= remainings(reply)[1] <= self.limit - self.log.used(t)
            return
        assert reply[1] == 2
        wait = reply[2]
        exact = self.log.wait(t, cost)
        if exact < 0:
            assert wait == -1
            return
        # Never earlier than the exact log, and at most one slot (+1 µs) later.
        assert exact <= wait <= exact + self.slot_ceil + 1, (exact, wait)
        # (c) Retry-After never lies: the same request passes after the wait.
        assert self.probe(t + wait, self.keys, args)[0] == 1
        # (b) A refusal the exact log would not make is undone one slot later.
        if exact == 0:
            assert self.probe(t + self.slot_ceil, self.keys, args)[0] == 1


@pytest.mark.slow
def test_sliding_window_is_strict_and_honest(make_backend: Callable[[], Backend]) -> None:
    run_state_machine_as_test(lambda: WindowMachine(make_backend()),
                              settings=machine_settings(EXAMPLES))


# ----------------------------------------------------------------------------------------
# 2. Token bucket

RATES = [0.1, 1 / 3, 0.5, 1.0, 2.5, 7.0, 1000.0]
EPS = Fraction(1, 10**6)


class BucketMachine(Clocked):
    @initialize(capacity=st.integers(1, 10), rate=st.sampled_from(RATES), start=START)
    def setup(self, capacity: int, rate: float, start: int) -> None:
        self.compiled = compile_plan(Plan("p", burst=capacity, refill_per_second=rate))
        assert [layer.kind for layer in self.compiled.layers] == ["b"]
        self.keys = [PREFIX + s for s in self.compiled.suffixes]
        self.capacity, self.rate = capacity, Fraction(rate)
        self.unit_us, self.length_us = 1e6 / rate, math.ceil(capacity * 1e6 / rate)
        self.ref = ExactBucket(capacity, rate, start)
        self.admitted: list[tuple[int, int]] = []
        self.b.now_us = start

    @rule(cost=st.integers(1, 3))
    def request(self, cost: int) -> None:
        t, args = self.now, with_costs(self.compiled, {0: cost})
        level = self.ref.level(t)
        reply = self.b.acquire(self.keys, args)
        if cost > self.capacity:   # more than the bucket ever holds: refused, and for good
            assert (reply[0], reply[1], reply[2]) == (0, 1, -1)
            return
        # Ours decides as the exact bucket does (but within float rounding of the boundary).
        if level >= cost + EPS:
            assert reply[0] == 1, (float(level), cost)
        elif level < cost - EPS:
            assert reply[0] == 0, (float(level), cost)
        if reply[0] == 1:
            self.ref.take(t, cost)
            self.admitted.append((t, cost))
            # In any interval [t0, t]: at most capacity + rate * (t - t0) units.
            for t0, _ in self.admitted:
                units = sum(c for u, c in self.admitted if u >= t0)
                assert units <= self.capacity + self.rate * (t - t0) / 10**6 + EPS
            left = self.ref.level(t)
        else:
            wait = reply[2]
            exact = (cost - level) / self.rate * 10**6
            # (cost - tokens) / rate + 1 µs, rounded up; the float subtraction may cost a µs.
            assert exact < wait <= math.ceil(exact + 1 + EPS), (float(exact), wait)
            # Retry-After is honest: after the wait the same request passes.
            assert self.probe(t + wait, self.keys, args)[0] == 1
            left = level
        if abs(left - round(left)) > EPS:
            assert remainings(reply)[0] == math.floor(left)


@pytest.mark.slow
def test_token_bucket_bounds_and_honest_wait(make_backend: Callable[[], Backend]) -> None:
    run_state_machine_as_test(lambda: BucketMachine(make_backend()),
                              settings=machine_settings(EXAMPLES))


def test_bucket_cost_above_capacity_never_passes(make_backend: Callable[[], Backend]) -> None:
    b = make_backend()
    b.now_us = 1_700_000_000_000_000
    compiled = compile_plan(Plan("p", burst=2, refill_per_second=1.0))
    keys, args = [PREFIX + "b"], with_costs(compiled, {0: 3})
    reply = b.acquire(keys, args)
    assert reply[0] == 0
    b.now_us += max(reply[2], 0) + 10**9
    assert b.acquire(keys, args)[0] == 0   # it truly never passes...
    assert reply[2] == -1                  # ...so the reply must say so, as windows do


# ----------------------------------------------------------------------------------------
# 3. All or nothing


class AllOrNothingMachine(Clocked):
    @initialize(burst=st.integers(1, 4), rate=st.sampled_from([0.2, 1.0, 3.0]),
                quotas=TWO_WINDOWS, start=START)
    def setup(self, burst: int, rate: float, quotas: list[tuple[int, int]], start: int) -> None:
        plan = bucket_and_windows(burst, rate, quotas)
        self.compiled = compile_plan(plan)
        assert [layer.kind for layer in self.compiled.layers] == ["b", "w", "w"]
        self.peek_args = list(compile_plan(plan, cost=0).args)
        self.keys = [PREFIX + s for s in self.compiled.suffixes]
        self.unit_us = min(s for _, s in quotas) * 1e6 / 60
        self.length_us = max(s for _, s in quotas) * 10**6
        self.b.now_us = start

    @rule(costs=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)))
    def request(self, costs: tuple[int, int, int]) -> None:
        limits = [int(layer.limit) for layer in self.compiled.layers]
        args = with_costs(self.compiled, dict(enumerate(costs)))
        before = self.b.raw(self.keys)
        reply = self.b.acquire(self.keys, args)
        after = self.b.raw(self.keys)
        if reply[0] == 0:
            assert after == before, f"refused by layer {reply[1]}, yet state changed"
            if reply[2] < 0:
                assert any(c > n for c, n in zip(costs, limits, strict=True))
            else:
                # The call's wait is the longest of its layers': then every layer passes.
                assert self.probe(self.now + reply[2], self.keys, args)[0] == 1
        peek = self.b.acquire(self.keys, self.peek_args)
        assert self.b.raw(self.keys) == after, "a look (cost 0) wrote"
        assert peek[0] == 1
        # What a reply says is left, refused or not, is what a look says right after.
        assert remainings(reply) == remainings(peek)


@pytest.mark.slow
def test_refusal_changes_nothing(make_backend: Callable[[], Backend]) -> None:
    run_state_machine_as_test(lambda: AllOrNothingMachine(make_backend()),
                              settings=machine_settings(EXAMPLES))


# ----------------------------------------------------------------------------------------
# 4. memory:// and the Lua script agree


@dataclass
class Reserved:
    at: int
    tokens: int
    usd: int
    lease: str


class AgreementMachine(RuleBasedStateMachine):
    """One random sequence on both backends at once, every reply compared."""

    def __init__(self, memory: ClockedMemory, valkey: ClockedValkey) -> None:
        super().__init__()
        self.backends: tuple[Backend, Backend] = (memory, valkey)
        self.reserved: list[Reserved] = []
        self.leases = 0

    @initialize(burst=st.integers(1, 5), rate=st.sampled_from(RATES),
                quota=st.tuples(st.integers(1, 10), st.sampled_from([1, 10, 60, 3600])),
                tokens=st.integers(10, 300), usd=st.integers(100, 5000),
                concurrent=st.integers(1, 3), ttl=st.integers(1, 30), start=START)
    def setup(self, burst: int, rate: float, quota: tuple[int, int], tokens: int, usd: int,
              concurrent: int, ttl: int, start: int) -> None:
        n, seconds = quota
        self.plan = Plan("p", burst=burst, refill_per_second=rate,
                         quotas=(Window(n, seconds, f"{n} per {seconds} seconds"),),
                         tokens_per_minute=tokens, budget_usd_per_day=usd / 1e6,
                         max_concurrent=concurrent, lease_ttl_seconds=ttl)
        self.compiled = compile_plan(self.plan, llm=True)
        self.layers = self.compiled.layers
        assert [layer.kind for layer in self.layers] == ["b", "w", "W", "W", "c"]
        self.peek_args = list(compile_plan(self.plan, cost=0, llm=True).args)
        self.keys = [PREFIX + s for s in self.compiled.suffixes]
        self.set_now(start)

    @property
    def now(self) -> int:
        return self.backends[0].now_us

    def set_now(self, now: int) -> None:
        for b in self.backends:
            b.now_us = now

    def acquire(self, args: list[bytes], keys: list[str] | None = None) -> list[int]:
        mem, lua = (b.acquire(keys or self.keys, args) for b in self.backends)
        # Every element, waits and resets included, to the µs: no rounding slack was needed.
        assert mem == lua
        event(f"agreement: {'allowed' if mem[0] else f'refused by layer {mem[1]}'}")
        return mem

    def settle(self, keys: list[str], args: list[Any]) -> None:
        # The return value is not compared: memory:// counts the layers it was given,
        # settle.lua the layers it changed; Reservation ignores it.
        for b in self.backends:
            b.settle(keys, args)

    @rule(n=st.integers(0, 30),
          unit=st.sampled_from([1, 1000, 10**6, 60 * 10**6, 3600 * 10**6, 86400 * 10**6]))
    def advance(self, n: int, unit: int) -> None:
        self.set_now(self.now + n * unit)

    @rule(layer=st.sampled_from([1, 2, 3]), off=st.integers(-2, 2))
    def to_slot_edge(self, layer: int, off: int) -> None:
        slot = self.layers[layer].param / 60
        target = math.ceil((math.floor(self.now / slot) + 1) * slot) + off
        if target > self.now:
            self.set_now(target)

    @rule(tokens=st.integers(1, 150), usd=st.integers(0, 2000))
    def reserve(self, tokens: int, usd: int) -> None:
        self.leases += 1
        lease = f"lease{self.leases}"
        reply = self.acquire(with_costs(self.compiled, {2: tokens, 3: usd, 4: lease}))
        if reply[0] == 1:
            self.reserved.append(Reserved(reply[3], tokens, usd, lease))

    @rule()
    def peek(self) -> None:
        self.acquire(self.peek_args)

    @rule(tokens=st.integers(1, 150), usd=st.integers(0, 2000),
          alt_usd=st.tuples(st.integers(0, 2000), st.integers(0, 2000)),
          guards=st.tuples(st.integers(1, 4), st.integers(1, 200)),
          wait=st.sampled_from([0, 3_000_000]), second=st.booleans())
    def reserve_or_fall_back(self, tokens: int, usd: int, alt_usd: tuple[int, int],
                             guards: tuple[int, int], wait: int, second: bool) -> None:
        """A reservation with fallback models (acquire.lua's ALTERNATIVES): the asked model's
        guard (requests), a first fallback's (tokens), a second without a guard; each at its
        own dollar cost."""
        self.leases += 1
        lease = f"lease{self.leases}"
        asked = AcquireCall(self.keys, with_costs(self.compiled, {2: tokens, 3: usd, 4: lease}))
        asked = asked.join(AcquireCall([PREFIX + "g-asked"],
                                       layer_args("w", guards[0], 60_000_000, "1")))
        alts: list[tuple[AcquireCall, AcquireCall | None]] = [(
            AcquireCall(self.keys, with_costs(self.compiled,
                                              {2: tokens, 3: alt_usd[0], 4: lease})),
            AcquireCall([PREFIX + "g-alt"], layer_args("W", guards[1], 60_000_000,
                                                       str(tokens))))]
        if second:
            alts.append((AcquireCall(self.keys, with_costs(
                self.compiled, {2: tokens, 3: alt_usd[1], 4: lease})), None))
        sent = with_alternatives(asked, wait, 1, alts)
        reply = self.acquire(list(sent.args), sent.keys)
        served = reply[-1]
        event(f"fallback: {'refused' if not reply[0] else f'served by {served}'}")
        if reply[0] == 1:
            spent = usd if served == 0 else alt_usd[served - 1]
            self.reserved.append(Reserved(reply[3] + reply[2], tokens, spent, lease))

    @precondition(lambda self: self.reserved)
    @rule(pick=st.integers(0, 100), tokens=st.integers(0, 200), usd=st.integers(0, 3000))
    def settle_usage(self, pick: int, tokens: int, usd: int) -> None:
        """Reservation.settle: the units move to what was used; the lease goes."""
        held = self.reserved.pop(pick % len(self.reserved))
        keys, args = [], [held.at]
        for i, spent, amount in ((2, tokens, held.tokens), (3, usd, held.usd)):
            if spent != amount:
                keys.append(self.keys[i])
                args += [self.layers[i].kind, self.layers[i].param, spent - amount]
        keys.append(self.keys[4])
        args += ["c", self.layers[4].param, held.lease]
        self.settle(keys, args)

    @precondition(lambda self: self.reserved)
    @rule(pick=st.integers(0, 100))
    def refund(self, pick: int) -> None:
        """Reservation.refund_everything: as if the request never came."""
        held = self.reserved.pop(pick % len(self.reserved))
        b, w, t, u, c = self.layers
        args: list[Any] = [held.at, "b", b.limit, -1, w.kind, w.param, -1,
                           t.kind, t.param, -held.tokens, u.kind, u.param, -held.usd,
                           "c", c.param, held.lease]
        self.settle(self.keys, args)

    @precondition(lambda self: self.reserved)
    @rule(pick=st.integers(0, 100))
    def renew(self, pick: int) -> None:
        """Reservation.renew, of a live lease or of one already past its TTL."""
        held = self.reserved[pick % len(self.reserved)]
        self.settle([self.keys[4]], [held.at, "r", self.layers[4].param, held.lease])


@pytest.mark.slow
def test_memory_and_lua_agree(r: redis.Redis) -> None:
    run_state_machine_as_test(lambda: AgreementMachine(ClockedMemory(), ClockedValkey(r)),
                              settings=machine_settings(2 * EXAMPLES, steps=50))


@pytest.mark.parametrize("look", [True, False])
def test_renewing_an_expired_lease_agrees(r: redis.Redis, look: bool) -> None:
    replies: dict[str, list[Any]] = {}
    for b in (ClockedMemory(), ClockedValkey(r)):
        b.now_us = start = 1_700_000_000_000_000
        keys, ttl = [PREFIX + "cc"], 10_000_000
        out = [b.acquire(keys, ["c", "1", str(ttl), "L1"])[0]]
        b.now_us += ttl + 1                                  # L1 has expired, its key not yet
        if look:   # a look sweeps expired leases on Valkey, not in memory://
            out.append(b.acquire(keys, ["c", "1", str(ttl), "-"])[0])
        b.settle(keys, [start, "r", ttl, "L1"])             # the stream renews late
        out.append(b.acquire(keys, ["c", "1", str(ttl), "L2"])[0])      # another request
        replies[b.name] = out
    # The late renewal brings nothing back: L2 gets the one place, on both backends.
    assert replies["memory"] == replies["valkey"] == [1] * (3 if look else 2)


# ----------------------------------------------------------------------------------------
# 5. Settle


class SettleMachine(Clocked):
    @initialize(limit=st.integers(50, 300), shape=st.sampled_from(SHAPES), start=START)
    def setup(self, limit: int, shape: tuple[int, bool], start: int) -> None:
        seconds, self.wide = shape
        self.compiled = window_plan(limit, seconds, self.wide)
        self.layer = self.compiled.layers[1]
        self.keys = [PREFIX + s for s in self.compiled.suffixes]
        self.key = self.keys[1]
        self.limit, self.length_us = limit, seconds * 10**6
        self.unit_us = self.length_us / 60
        self.ref = SlotLog(self.length_us)
        self.pending: list[Held] = []
        self.b.now_us = start

    @rule(cost=st.integers(1, 40))
    def reserve(self, cost: int) -> None:
        total = self.ref.total(self.now)
        reply = self.b.acquire(self.keys, with_costs(self.compiled, {1: cost}))
        assert reply[0] == (total + cost <= self.limit), (total, cost, reply)
        if reply[0] == 1:
            held = Held(reply[3], cost, cost)
            self.ref.held.append(held)
            self.pending.append(held)
            assert remainings(reply)[1] == self.limit - total - cost

    @precondition(lambda self: self.pending)
    @rule(pick=st.integers(0, 100), off=st.integers(-2, 2))
    def to_slot_leaving(self, pick: int, off: int) -> None:
        """Near the time a pending reservation's slot leaves the window."""
        held = self.pending[pick % len(self.pending)]
        target = math.ceil((self.ref.slot(held.at) + SLOTS) * self.unit_us) + off
        if target > self.now:
            self.b.now_us = target

    @precondition(lambda self: self.pending)
    @rule(pick=st.integers(0, 100), actual=st.integers(0, 80))
    def settle(self, pick: int, actual: int) -> None:
        held = self.pending.pop(pick % len(self.pending))
        before = self.b.raw([self.key])
        # As Reservation._finish sends it: the acquire's now, kind, window, actual - reserved.
        self.b.settle([self.key], [held.at, self.layer.kind, self.layer.param,
                                   actual - held.reserved])
        if actual == held.reserved:
            assert self.b.raw([self.key]) == before
        elif self.ref.alive(held, self.now):
            held.amount = actual
            event("settle: in the window")
        else:
            # Its slot has left the window: there is nothing to give back or to charge.
            assert self.b.raw([self.key]) == before
            event("settle: slot gone")

    @rule()
    def peek(self) -> None:
        reply = self.b.acquire(self.keys, with_costs(self.compiled, {1: 0}))
        assert remainings(reply)[1] == max(0, self.limit - self.ref.total(self.now))

    @invariant()
    def never_negative(self) -> None:
        if not hasattr(self, "key"):
            return
        state = self.b.window(self.key, self.wide)
        if state is not None:
            _, total, slots = state
            assert total >= 0 and min(slots) >= 0
            assert total == pytest.approx(sum(slots), abs=1e-6)


@pytest.mark.slow
def test_settle_moves_the_charged_slot(make_backend: Callable[[], Backend]) -> None:
    run_state_machine_as_test(lambda: SettleMachine(make_backend()),
                              settings=machine_settings(EXAMPLES))


# ----------------------------------------------------------------------------------------
# 6. Calendar months, longer windows and shadow layers

DAY_US = 86_400 * 10**6


def utc_month(t: int) -> tuple[int, int, int]:
    """(year * 12 + month - 1, start µs, end µs), from datetime: the reference for "m"."""
    moment = datetime.fromtimestamp(t // 10**6, UTC)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    end = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    return (moment.year * 12 + moment.month - 1, int(start.timestamp()) * 10**6,
            int(end.timestamp()) * 10**6)


# Just before a month ends: February of leap and non-leap years (2100 is not one), 30- and
# 31-day months, the turn of a year.
MONTH_ENDS = st.builds(
    lambda year, month, back: utc_month(int(datetime(year, month, 1, tzinfo=UTC).timestamp())
                                        * 10**6)[2] - back,
    st.sampled_from([2000, 2023, 2024, 2025, 2099, 2100]), st.integers(1, 12),
    st.integers(0, 3 * DAY_US))


def test_month_bounds_is_the_calendar() -> None:
    for t in [0, 951_782_400 * 10**6 - 1, 951_782_400 * 10**6, 4_107_542_400 * 10**6 - 1,
              1_709_164_800 * 10**6, 1_735_689_600 * 10**6 - 1]:
        assert month_bounds(t) == utc_month(t)
    for year, days in ((2100, 28), (2000, 29), (2024, 29), (2023, 28)):
        _, start, end = month_bounds(int(datetime(year, 2, 15, tzinfo=UTC).timestamp()) * 10**6)
        assert (end - start) // DAY_US == days


def month_plan(limit: int, usd: int, mode: str = "enforce") -> CompiledPlan:
    plan = Plan("p", burst=10**9, refill_per_second=1e9, budget_usd_per_month=usd / 1e6,
                quotas=(Window(limit, MONTH, f"{limit} per month", calendar=True),), mode=mode)
    return compile_plan(plan, llm=True)


class MonthMachine(Clocked):
    """A month quota and a month budget against exact per-month totals from datetime."""

    unit_us = DAY_US
    length_us = 31 * DAY_US

    @initialize(limit=st.integers(1, 8), usd=st.integers(10, 400), start=MONTH_ENDS)
    def setup(self, limit: int, usd: int, start: int) -> None:
        self.compiled = month_plan(limit, usd)
        assert [layer.kind for layer in self.compiled.layers] == ["b", "m", "m"]
        self.keys = [PREFIX + s for s in self.compiled.suffixes]
        self.limits = (limit, usd)
        # Each month key as the scripts keep it: (month it counts, count, expires at µs).
        self.stored: dict[int, tuple[int, int, int]] = {}
        self.pending: list[tuple[int, int]] = []          # (charged at, usd reserved)
        self.b.now_us = start

    @rule(off=st.integers(-2, 2))
    def to_month_edge(self, off: int) -> None:
        target = utc_month(self.now)[2] + off
        if target > self.now:
            self.b.now_us = target

    def used(self, layer: int, t: int) -> int:
        month, count, expires = self.stored.get(layer, (-1, 0, 0))
        return count if month == utc_month(t)[0] and t < expires else 0

    @rule(cost=st.integers(1, 3), usd=st.integers(0, 150))
    def request(self, cost: int, usd: int) -> None:
        t, args = self.now, with_costs(self.compiled, {1: cost, 2: usd})
        month, _, end = utc_month(t)
        reply = self.b.acquire(self.keys, args)
        fits = [self.used(i + 1, t) + c <= n for i, (c, n) in
                enumerate(zip((cost, usd), self.limits, strict=True))]
        assert reply[0] == all(fits), (fits, reply)
        if reply[0]:
            for i, c in ((1, cost), (2, usd)):
                if c > 0:   # a cost of 0 writes nothing
                    ttl_ms = -(-(end - t) // 1000) + 1000
                    self.stored[i] = (month, self.used(i, t) + c, t + ttl_ms * 1000)
            self.pending.append((t, usd))
            assert remainings(reply)[1:] == [self.limits[0] - self.used(1, t),
                                             self.limits[1] - self.used(2, t)]
            assert reply[7] == end - t   # the quota's reset: 00:00 UTC on the next 1st
            return
        if cost > self.limits[0] or usd > self.limits[1]:
            assert reply[2] == -1
            return
        # Exactly the first µs of next month, 00:00 UTC on the 1st: not one µs earlier.
        assert reply[2] == end - t
        assert self.probe(end, self.keys, args)[0] == 1
        assert self.probe(end - 1, self.keys, args)[0] == 0

    @precondition(lambda self: self.pending)
    @rule(pick=st.integers(0, 100), actual=st.integers(0, 200))
    def settle(self, pick: int, actual: int) -> None:
        at, reserved = self.pending.pop(pick % len(self.pending))
        layer = self.compiled.layers[2]
        call = SettleCall(at)   # as Reservation sends it: the month named by the acquire's now
        call.add(self.keys[2], layer.kind, layer.param, actual - reserved)
        self.b.settle(call.keys, call.args)
        month, count, expires = self.stored.get(2, (-1, 0, 0))
        # Only the charged month's count moves: a month that has ended gives nothing back.
        if month == utc_month(at)[0] and self.now < expires:
            self.stored[2] = (month, max(0, count + actual - reserved), expires)
            event("month settle: applied")

    @rule()
    def peek(self) -> None:
        reply = self.b.acquire(self.keys, with_costs(self.compiled, {1: 0, 2: 0}))
        assert remainings(reply)[1:] == [max(0, n - self.used(i + 1, self.now))
                                         for i, n in enumerate(self.limits)]


@pytest.mark.slow
def test_month_counts_the_calendar_month(make_backend: Callable[[], Backend]) -> None:
    run_state_machine_as_test(lambda: MonthMachine(make_backend()),
                              settings=machine_settings(EXAMPLES))


class LongAgreementMachine(RuleBasedStateMachine):
    """Week and month quotas, tokens per day, dollars per month, enforcing or shadow: one
    sequence on memory:// and on the Lua, every reply equal, settles as Engine sends them."""

    def __init__(self, memory: ClockedMemory, valkey: ClockedValkey, mode: str) -> None:
        super().__init__()
        self.backends: tuple[Backend, Backend] = (memory, valkey)
        self.mode = mode
        self.reserved: list[tuple[int, dict[int, int]]] = []

    @initialize(week=st.integers(1, 10), month=st.integers(1, 20), tokens=st.integers(10, 300),
                usd=st.integers(100, 3000), start=MONTH_ENDS)
    def setup(self, week: int, month: int, tokens: int, usd: int, start: int) -> None:
        plan = Plan("p", burst=10**9, refill_per_second=1e9, mode=self.mode,
                    quotas=(Window(week, 604800, f"{week} per week"),
                            Window(month, MONTH, f"{month} per month", calendar=True)),
                    tokens_per_day=tokens, budget_usd_per_month=usd / 1e6)
        self.compiled = compile_plan(plan, llm=True)
        self.layers = self.compiled.layers
        assert [(x.kind, x.name) for x in self.layers] == [
            ("b", "user"), ("w", "quota-week"), ("m", "quota-month"), ("W", "tokens-day"),
            ("m", "usd-month")]
        assert all(x.shadow == (self.mode == "shadow") for x in self.layers)
        self.keys = [PREFIX + s for s in self.compiled.suffixes]
        for b in self.backends:
            b.now_us = start

    @property
    def now(self) -> int:
        return self.backends[0].now_us

    def acquire(self, args: list[bytes]) -> list[int]:
        mem, lua = (b.acquire(self.keys, args) for b in self.backends)
        assert mem == lua
        return mem

    @rule(n=st.integers(0, 30), unit=st.sampled_from([1, 10**6, 3600 * 10**6, DAY_US,
                                                       7 * DAY_US]))
    def advance(self, n: int, unit: int) -> None:
        for b in self.backends:
            b.now_us += n * unit

    @rule(off=st.integers(-2, 2))
    def to_month_edge(self, off: int) -> None:
        target = utc_month(self.now)[2] + off
        if target > self.now:
            for b in self.backends:
                b.now_us = target

    @rule(cost=st.integers(1, 3), tokens=st.integers(1, 150), usd=st.integers(0, 2000))
    def reserve(self, cost: int, tokens: int, usd: int) -> None:
        costs = {1: cost, 2: cost, 3: tokens, 4: usd}
        reply = self.acquire(with_costs(self.compiled, costs))
        if self.mode == "shadow":
            assert reply[0] == 1, "a shadow layer refused"
        if reply[0] == 1:
            # As Engine.reserve: a shadow layer that would have refused was not charged.
            charged = {i: c for i, c in costs.items() if remainings(reply)[i] >= 0}
            self.reserved.append((reply[3], charged))

    @rule()
    def peek(self) -> None:
        self.acquire(with_costs(self.compiled, {1: 0, 2: 0, 3: 0, 4: 0}))

    @precondition(lambda self: self.reserved)
    @rule(pick=st.integers(0, 100), tokens=st.integers(0, 200), usd=st.integers(0, 3000),
          refund=st.booleans())
    def settle(self, pick: int, tokens: int, usd: int, refund: bool) -> None:
        """Reservation.settle (tokens and dollars to what was used) or refund_everything."""
        at, charged = self.reserved.pop(pick % len(self.reserved))
        call = SettleCall(at)
        actual = {1: 0, 2: 0, 3: 0, 4: 0} if refund else {3: tokens, 4: usd}
        for i, amount in charged.items():
            if i in actual and actual[i] != amount:
                call.add(self.keys[i], self.layers[i].kind, self.layers[i].param,
                         actual[i] - amount)
        for b in self.backends:
            b.settle(call.keys, call.args)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["enforce", "shadow"])
def test_longer_windows_agree(r: redis.Redis, mode: str) -> None:
    run_state_machine_as_test(lambda: LongAgreementMachine(ClockedMemory(), ClockedValkey(r),
                                                           mode),
                              settings=machine_settings(EXAMPLES, steps=50))


def test_shadow_layer_never_refuses_and_counts_what_it_admits(
        make_backend: Callable[[], Backend]) -> None:
    """A refusal by an enforcing layer charges nothing, the shadow layers included; a shadow
    layer that would refuse lets the request through uncounted, the enforcing ones count it."""
    b = make_backend()
    b.now_us = 1_709_000_000_000_000
    shadow = replace(window("quota-day", "q86400", 2, 86400, "fail_closed"), shadow=True)
    enforcing = window("quota-minute", "q60", 3, 60, "fail_closed")
    compiled = compile_plan(None, (shadow, enforcing))
    assert compiled.args[0] == b"w?" and compiled.shadow
    keys = [PREFIX + "s", PREFIX + "e"]
    replies = [b.acquire(keys, list(compiled.args)) for _ in range(4)]
    assert [x[0] for x in replies] == [1, 1, 1, 0]
    assert [remainings(x) for x in replies[:3]] == [[1, 2], [0, 1], [-1, 0]]
    assert replies[3][1] == 2 and remainings(replies[3]) == [-1, 0]
    decision = from_reply(compiled, AcquireReply.parse(replies[2]))
    assert [s.remaining for s in decision.states] == [0, 0]
    assert [s.layer.name for s in decision.would_refuse] == ["quota-day"]
    assert not decision.charged(shadow) and decision.charged(enforcing)
    peek = b.acquire(keys, list(compile_plan(None, (shadow, enforcing), cost=0).args))
    assert remainings(peek) == [0, 0]   # the day counted 2, the minute 3: no more


def test_month_headers_say_this_month(r: redis.Redis) -> None:
    b = ClockedValkey(r, now_us=int(datetime(2024, 2, 10, 6, tzinfo=UTC).timestamp()) * 10**6)
    compiled = month_plan(5, 1000)
    reply = AcquireReply.parse(b.acquire([PREFIX + s for s in compiled.suffixes],
                                         with_costs(compiled, {1: 1, 2: 10})))
    headers = rate_limit_headers(from_reply(compiled, reply))
    assert '"quota-month";q=5;w=2505600' in headers["RateLimit-Policy"]    # 29 days
    assert '"usd-month";q=1000;w=2505600' in headers["RateLimit-Policy"]
    until_march = (20 * 24 - 6) * 3600   # Feb 10, 06:00 to Mar 1, 00:00 UTC
    assert f'"quota-month";r=4;t={until_march}' in headers["RateLimit"]
