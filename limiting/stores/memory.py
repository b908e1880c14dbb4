"""memory:// — the acquire algorithm in this process, for a single-process dev server.

Same semantics as lua/acquire.lua, guarded by one lock. State is per process: under gunicorn
with several workers each would count alone, so use Redis there.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import replace
from typing import Any

from ..core.alternatives import decode_alternatives
from ..core.codec import (
    AcquireReply,
    Kind,
    LayerCall,
    decode_acquire,
    decode_ledger_counts,
    decode_ledger_rank,
    decode_max_wait,
    decode_settle,
)
from ..core.windows import month_bounds
from .memory_alerts import AlertsMirror
from .memory_verdicts import Verdict, alternatives, refused, worst_of
from .store import ScriptArgs, StoreUnavailable
from .tables import MemoryTables

# Kinds whose cost a shadow layer that would refuse leaves uncounted (as acquire.lua).
COUNTED = (Kind.BUCKET, Kind.WINDOW, Kind.WIDE_WINDOW, Kind.MONTH)

SLOTS = 61


class MemoryStore(MemoryTables):
    single_node = False   # the edge stays Flask-Limiter's, on its own memory storage

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._lock = threading.Lock()
        self._alerts = AlertsMirror()
        # key -> (expires_at_us, state); state is ["b", tokens, at] or
        # ["w", last, total, slots, {slot ahead of the ring: count}] (acquire.lua's tail)
        # The same dict holds what keys, overrides, the ledger and the audit trail keep
        # (tables.py's kinds "h", "z", "x" and "s"), so one key name is one thing, as in Redis.
        self._data: dict[str, tuple[float, list[Any]]] = {}

    def _now_us(self) -> int:
        return time.time_ns() // 1000

    def _get(self, key: str, now: int) -> list[Any] | None:
        item = self._data.get(key)
        if item is None or item[0] <= now:
            return None
        return item[1]

    def acquire(self, keys: list[str], args: ScriptArgs) -> list[int]:
        with self._lock:
            now = self._now_us()
            max_wait = decode_max_wait(args, len(keys))
            calls = decode_acquire(args, len(keys))
            alts = decode_alternatives(args, len(keys))
            if alts is not None:
                def decide(i: int, cost: str | None = None) -> Verdict:
                    call = calls[i] if cost is None else replace(calls[i], cost=cost)
                    return self._decide(keys[i], call, now, max_wait)

                return alternatives(alts, decide, lambda reply, layers: self._commit(
                    reply, layers, now), now)
            layers = [self._decide(key, call, now, max_wait)
                      for key, call in zip(keys, calls, strict=True)]
            reply = AcquireReply(True, 0, 0, now, [v.state() for v in layers])
            worst_wait, worst = worst_of(layers)
            if worst:
                return refused(reply, layers, worst, worst_wait).encode()
            return self._commit(reply, layers, now).encode()

    def _commit(self, reply: AcquireReply, layers: list[Verdict], now: int) -> AcquireReply:
        """Admitted: it runs `delay` µs from now; its bucket and windows charged as then."""
        longest = max((v.slot_wait for v in layers if v.before is not None), default=0.0)
        delay = math.ceil(longest - 0.001) if longest > 0 else 0   # float dust: no µs
        reply.wait_us = delay
        for v in layers:
            if v.write is not None and v.cost > 0:  # cost 0 only looks
                state, ttl_us = v.write
                if callable(state):
                    state, ttl_us = state(delay)
                self._data[v.key] = (now + ttl_us, state)
        if len(self._data) > 100_000:
            self._data = {k: v for k, v in self._data.items() if v[0] > now}
        return reply

    def _decide(self, key: str, call: LayerCall, now: int, max_wait: float) -> Verdict:
        """One layer of acquire.lua's first pass: what it answers, and what it would write."""
        kind, a, b = call.kind, call.a, call.b
        shadow = kind.endswith("?")   # as acquire.lua: decided, never refusing
        if shadow:
            kind = kind[:-1]
        shared = kind == Kind.SHARED_BUCKET          # as acquire.lua: never waits, never in debt
        if shared:
            kind = Kind.BUCKET
        deadline = 0.0 if shadow or shared else max_wait
        state = self._get(key, now)
        pre = None
        if kind == Kind.LEASE:
            remaining, reset, wait, write = _leases(state, now, a, b, call.cost)
            cost = 0.0 if call.cost == "-" else 1.0
        elif kind == Kind.PACE:  # no provider pacing is learnt in memory
            remaining, reset, wait, write, cost = 0, 0, 0.0, None, 0.0
        elif kind == Kind.MONTH:
            cost = float(call.cost)
            remaining, reset, wait, write = _month(state, now, a, b, cost)
        else:
            cost = float(call.cost)
            step = _bucket if kind == Kind.BUCKET else _window
            remaining, reset, wait, write, pre = step(state, now, a, b, cost, deadline, shared)
        verdict = Verdict(key, remaining, reset, wait, write, cost, pre)
        if pre is not None:
            verdict.slot_wait, verdict.wait = wait, 0.0
        elif shadow and wait != 0:
            # As acquire.lua: passed uncounted; a remaining below 0 tells the caller.
            counted = cost if kind in COUNTED else 0.0
            verdict.remaining, verdict.wait, verdict.write = min(remaining - counted, -1), 0.0, None
            verdict.over = True
        return verdict

    def run(self, name: str, keys: list[str], args: ScriptArgs) -> Any:
        if name == "observe":
            return 0
        if name == "alerts":
            with self._lock:
                return self._alerts.run(keys, args, self._now_us() / 1000)
        if name != "settle":
            raise StoreUnavailable(f"memory:// does not run the {name!r} script")
        with self._lock:
            now = self._now_us()
            charged_at, items = decode_settle(args)
            for key, (kind, b, value) in zip(keys, items, strict=True):
                if kind in (Kind.LEDGER_COUNTS, Kind.LEDGER_RANK):
                    self._ledger(key, kind, b, value, now)
                    continue
                item = self._data.get(key)
                if item is None:
                    continue
                expires, state = item
                if kind in (Kind.LEASE, Kind.RENEW):
                    lease = value
                    if state[1].get(lease, 0) > now or (kind == Kind.LEASE and lease in state[1]):
                        # As settle.lua: a lease past its TTL is gone and is not renewed.
                        if kind == Kind.LEASE:
                            del state[1][lease]
                        else:
                            state[1][lease] = now + b
                            self._data[key] = (max(expires, now + b + 1e6), state)
                    continue
                delta = float(value)
                if kind == Kind.BUCKET:
                    # As settle.lua: a refund pays back waiters' debt (below 0) too.
                    left = min(b, state[1] - delta)
                    state[1] = left if delta <= 0 else max(0.0, left)
                    continue
                if kind == Kind.MONTH:
                    if state[1] == b:   # the month charged: an ended month gives nothing
                        state[2] = max(0.0, state[2] + delta)
                    continue
                slot = b / 60
                idx = math.floor(charged_at / slot)
                if idx > state[1] and math.floor(now / slot) - idx < SLOTS:
                    # As settle.lua: a waiter's tail slot; one at 0 leaves no trace.
                    tail = state[4]
                    left = max(0.0, tail.get(idx, 0.0) + delta)
                    if left > 0:
                        tail[idx] = left
                    else:
                        tail.pop(idx, None)
                elif idx <= state[1] and math.floor(now / slot) - idx < SLOTS:
                    held = state[3][idx % SLOTS]
                    new = max(0.0, held + delta)
                    state[3][idx % SLOTS] = new
                    state[2] = max(0.0, state[2] + new - held)
            return len(keys)

    def _ledger(self, key: str, kind: str, expire_ms: float, value: str, now: int) -> None:
        """As settle.lua's LEDGER_COUNTS and LEDGER_RANK: add to a day's counters or ranking,
        until it expires."""
        until = expire_ms * 1000
        if until <= now:
            return
        state = self._get(key, now) or [kind, {}]
        counts = state[1]
        if kind == Kind.LEDGER_COUNTS:
            for name, add in decode_ledger_counts(value).items():
                if add:
                    counts[name] = counts.get(name, 0) + add
        else:
            score, member = decode_ledger_rank(value)
            counts[member] = counts.get(member, 0) + score
        if counts:
            self._data[key] = (until, state)

    def ping(self) -> bool:
        return True

    def delete(self, keys: list[str]) -> int:
        with self._lock:
            return sum(self._data.pop(key, None) is not None for key in keys)

    def close(self) -> None:
        self._data.clear()


Step = tuple[float, float, float, "tuple[Any, float] | None", "float | None"]


def _bucket(state: list[Any] | None, now: int, cap: float, rate: float, cost: float,
            deadline: float, shared: bool = False) -> Step:
    """As acquire.lua: (remaining, reset, wait, write, remaining before it when admitted
    into a future slot). The write is charged as at the moment the request runs; a shared
    bucket's as now, from what it holds (never a debt)."""
    tokens = cap if state is None else min(cap, state[1] + (now - state[2]) * rate / 1e6)

    def write(delay: int, held: float = tokens) -> tuple[list[Any], float]:
        # As acquire.lua: the level at its run time, told as of now (below 0: a debt).
        left = held - cost
        if not shared:
            left = min(cap, held + delay * rate / 1e6) - cost - delay * rate / 1e6
        return ["b", left, now], math.ceil((cap - left) / rate * 1000) * 1000 + 1e6

    if tokens >= cost:
        left = tokens - cost
        return left, (cap - left) / rate * 1e6, 0.0, (write, 0.0), None
    wait = -1.0 if cost > cap else (cost - tokens) / rate * 1e6 + 1
    # Its slot, exactly: no µs of margin that would pile up along a queue of waiters.
    if wait >= 0 and math.ceil(wait - 1 - 0.001) <= deadline:
        left = tokens - cost
        return left, (cap - left) / rate * 1e6, wait - 1, (write, 0.0), tokens
    return tokens, (cap - tokens) / rate * 1e6, wait, None, None


def _leases(state: list[Any] | None, now: int, most: float, ttl_us: float, lease: str
            ) -> tuple[float, float, float, tuple[list[Any], float] | None]:
    held = {k: v for k, v in (state[1] if state else {}).items() if v > now}
    first = min(min(held.values(), default=now) - now, ttl_us)
    if lease == "-":
        return most - len(held), first, 0.0, None
    if len(held) < most:
        held[lease] = now + ttl_us
        return most - len(held), first, 0.0, (["c", held], ttl_us + 1e6)
    # As acquire.lua: the latest a slot frees is when the soonest lease runs out its TTL.
    return most - len(held), first, max(1e6, first), None


def _month(state: list[Any] | None, now: int, limit: float, _: float, cost: float
           ) -> tuple[float, float, float, tuple[list[Any], float] | None]:
    month, _start, stop = month_bounds(now)
    total = state[2] if state is not None and state[1] == month else 0.0
    if total + cost <= limit:
        total += cost
        write = (["m", month, total], math.ceil((stop - now) / 1000) * 1000 + 1e6)
        return limit - total, stop - now if total > 0 else 0.0, 0.0, write
    wait = -1.0 if cost > limit else float(stop - now)
    return limit - total, stop - now if total > 0 else 0.0, wait, None


def _advance(slots: list[float], total: float, start: int, stop: int) -> float:
    """As acquire.lua's advance: slots start+1..stop take the ring places of those leaving."""
    if stop - start >= SLOTS:
        slots[:] = [0.0] * SLOTS
        return 0.0
    for k in range(start + 1, stop + 1):
        total -= slots[k % SLOTS]
        slots[k % SLOTS] = 0.0
    return total


def _first_free(slots: list[float], total: float, at: dict[int, float], e: int, newest: int,
                cost: float, limit: float) -> int:
    """As acquire.lua: the slot after the last window, ending at e or later, with no room
    for ``cost`` (e itself when every one has room)."""
    used, blocked = total, None
    for x in range(e, max(e, newest) + SLOTS):
        if x > e:
            gone = x - SLOTS
            used -= slots[gone % SLOTS] if gone <= e else at.get(gone, 0.0)
            used += at.get(x, 0.0)
        if used + cost > limit:
            blocked = x
    return e if blocked is None else blocked + 1


def _window(state: list[Any] | None, now: int, limit: float, length_us: float, cost: float,
            deadline: float, _shared: bool = False) -> Step:
    """As acquire.lua: the ring of 61 slots ends at the current slot (or a later one left by
    an older version); a waiter's charge ahead of it waits in the tail, counted in every
    window that holds it and moving no later caller's earliest slot."""
    slot = length_us / 60
    cur = math.floor(now / slot)
    tail: list[tuple[int, float]] = sorted(state[4].items()) if state is not None else []
    e = cur if state is None else max(cur, int(state[1]))
    if state is None or e - state[1] >= SLOTS:
        last, total, slots = e, 0.0, [0.0] * SLOTS
    else:
        last, total, slots = int(state[1]), state[2], list(state[3])
        total = _advance(slots, total, last, e)
    ahead, newest, at = 0.0, last, {}
    for k, held in tail:
        if k > e:
            at[k] = held
            ahead += held
        elif e - k < SLOTS:   # a waiter's slot has come: into the ring
            slots[k % SLOTS] += held
            total += held
        newest = max(newest, k)
    run, wait = e, 0.0
    if cost > limit:
        wait = -1.0
    elif total + ahead + cost > limit:
        run = _first_free(slots, total, at, e, newest, cost, limit)
    if wait == 0 and run > cur:
        wait = run * slot - now + 1
    far = max(e, newest)
    if not (wait == 0 or 0 < wait <= deadline):
        reset = (max(last, newest) + SLOTS) * slot - now
        return limit - total - ahead, reset, wait, None, None
    pre = limit - total - ahead if wait > 0 else None
    reset = (max(run, far) + SLOTS) * slot - now if total + ahead + cost != 0 else 0.0

    def write(delay: int) -> tuple[list[Any], float]:
        r = max(e, math.floor((now + delay) / slot))
        ring, ahead_of = list(slots), dict(at)
        held = total
        if r == e:
            ring[e % SLOTS] += cost
            held += cost
        else:
            ahead_of[r] = ahead_of.get(r, 0.0) + cost
        far = max([e, *ahead_of])
        return (["w", e, held, ring, ahead_of],
                math.ceil(((far + SLOTS) * slot - now) / 1000) * 1000 + 1e6)

    return limit - total - ahead - cost, reset, wait, (write, 0.0), pre

