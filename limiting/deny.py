"""Each worker's deny cache: a subject the store just refused with a wait is refused here, with
no store call, until that wait has passed — so a client hammering over its limit costs a dict
lookup per request instead of a script call.

What is cached, and for which requests it answers (it only ever refuses, so it can never let
through what the store would refuse):

- an **edge** refusal, by client IP: every request from that IP carries the edge's fixed
  windows in its call, whatever user id it names (an IP rotating user ids is held here);
- a refusal by one of a **user's plan request layers** (bucket, request quotas), by (realm,
  user), for requests decided on the very same Plan object (an API key on another plan, an
  override set or expired, a reload: another object, so the entry does not answer).

Not cached: a request that can never pass (no wait), fail-policy and fallback decisions, the
model's guard, org and route layers, and token, dollar and concurrency layers (their cost
varies per request, and a lease frees as soon as any call ends).

How stale it may be: an entry answers for at most ``MAX_STALE`` seconds (in its last
``PROBE_SECONDS`` one request asks the store again while the others are still answered here;
its refusal renews the entry), and never past the store's own wait, measured from when the
call was sent on the worker's monotonic clock (so never later than the store's moment).
Retry-After is the wait measured from when the reply came (rounded up: a client that waits
it passes). What can admit the subject sooner than its wait — ``limits reset``, ``limits
set``/``unset``, a reservation cancelled and given back — is seen within that bound;
``limits reset`` and overrides also clear every worker's cache at its next once-a-second
overrides check (limiting/overrides.py), and at once in the process that ran them.

Bounded: ``MAX_ENTRIES`` subjects, oldest first out (every entry is under a second old, so
oldest-first is least-recently-refused-first); an entry is about ``ENTRY_BYTES`` (its refused
Decision included), so a full cache holds about 8 MB per worker. As many aliases (what a
refused request presented, for limiting/web/door.py), ~350 bytes each, oldest first out.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from .core.decision import Decision, LayerState
from .core.layers import Layer
from .core.policy import Plan

MAX_STALE = 1.0
# When an entry comes due, one request asks the store and the entry answers the others for at
# most this much longer (so a worker's concurrent requests do not all ask at once).
PROBE_SECONDS = 0.1
MAX_ENTRIES = 10_000
# Measured with tracemalloc (tests/test_deny_cache.py): the key, the entry, its share of the
# OrderedDict and the refused Decision it keeps (two layers: ~680 bytes; each more ~100).
ENTRY_BYTES = 800

EDGE = "ip"   # the key's first part for an edge entry; else a user's Realm


@dataclass(slots=True)
class Denial:
    decision: Decision   # the store's refusal, as it answered
    plan: Plan | None    # the plan it was decided for; None: an edge refusal
    until: float         # send time + the store's wait: refused here only before this
    due: float           # then one request asks the store again (the probe)...
    stale: float         # ...and none is answered after this (send time + MAX_STALE at most)
    honest: float        # reply time + the store's wait: what Retry-After counts down to
    replied: float
    asked: bool = False  # the probe went out


class DenyCache:
    """The refusals one worker remembers; no store, no Flask: the extension asks it first
    (:meth:`refusal`) and tells it the store's refusals (:meth:`learn`)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 max_entries: int = MAX_ENTRIES, max_stale: float = MAX_STALE) -> None:
        # perf_counter: monotonic, and the clock the extension already reads per request.
        self.clock = clock
        self.max_entries = max_entries
        self.max_stale = max_stale
        self._entries: OrderedDict[tuple[str, str], Denial] = OrderedDict()
        self._aliases: OrderedDict[Hashable, tuple[str, str, str | None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every refusal (an operator changed limits: ask the store again)."""
        self._entries.clear()
        self._aliases.clear()

    def refusal(self, ip: str | None, user: str, realm: str, plan: Plan,
                patience: float = 0.0) -> Decision | None:
        """The refusal to answer now without the store, or None (ask the store).

        ``patience``: seconds this request may wait for a slot instead of a 429 (the plan's
        max_wait_seconds): an entry whose wait is within it does not answer."""
        if not self._entries:
            return None
        if ip is not None:
            answer = self.edge(ip, patience)
            if answer is not None:
                return answer
        return self.caller(user, realm, plan, patience)

    def edge(self, ip: str, patience: float = 0.0, probe: bool = True) -> Decision | None:
        """The edge's refusal of ``ip`` to answer now, or None. ``probe=False``: an entry that
        is due to be asked again is left for a request that will ask the store (the door's
        requests go on to Flask, where one does)."""
        key = (EDGE, ip)
        found = self._entries.get(key)
        if found is None:
            return None
        return self._answer(key, found, self.clock(), patience, probe)

    def caller(self, user: str, realm: str, plan: Plan, patience: float = 0.0,
               probe: bool = True) -> Decision | None:
        """The refusal of ``user``'s plan request layers to answer now, or None: only for a
        request decided on the very Plan object that was refused. ``probe``: as for
        :meth:`edge`."""
        key = (realm, user)
        found = self._entries.get(key)
        if found is None or found.plan is not plan:
            return None
        return self._answer(key, found, self.clock(), patience, probe)

    def alias(self, credential: Hashable, realm: str, user: str, key_plan: str | None
              ) -> None:
        """Remember who ``credential`` (an opaque token the web layer read from a refused
        request, such as its API key) named, so that a request presenting it again can be
        matched to its entry before anything else is known (limiting/web/door.py)."""
        aliases = self._aliases
        aliases.pop(credential, None)
        if len(aliases) >= self.max_entries:
            _drop_oldest(aliases)
        aliases[credential] = (realm, user, key_plan)

    def named(self, credential: Hashable) -> tuple[str, str, str | None] | None:
        """(realm, user, key plan) a refused request with ``credential`` named, or None."""
        return self._aliases.get(credential) if self._aliases else None

    def learn(self, decision: Decision, sent: float, ip: str | None, user: str, realm: str,
              plan: Plan, layers: tuple[Layer, ...], edge_count: int) -> str | None:
        """Remember the store's refusal ``decision`` of a call sent at ``sent`` (this clock),
        if it is one this cache may answer for: "edge" or "caller", what it kept (None:
        nothing). ``layers``/``edge_count``: the plan's compiled layers (the edge's first), to
        tell an edge or plan layer from an org's or a route's."""
        refused = decision.refused
        wait = decision.wait
        if (decision.allowed or refused is None or wait is None or wait <= 0
                or decision.unavailable or decision.degraded):
            return None
        layer = refused.layer
        if layer.shadow or layer.unit != "requests":
            return None
        try:
            at = layers.index(layer)
        except ValueError:   # an org's or a route's layer
            return None
        if at < edge_count:
            if ip is None:
                return None
            key, owner, kept = (EDGE, ip), None, "edge"
        else:
            key, owner, kept = (realm, user), plan, "caller"
        now = self.clock()
        due = sent + min(wait, self.max_stale - PROBE_SECONDS)
        entry = Denial(decision, owner, sent + wait, due,
                       min(due + PROBE_SECONDS, sent + self.max_stale), now + wait, now)
        entries = self._entries
        entries.pop(key, None)   # re-added last: the newest
        if len(entries) >= self.max_entries:
            _drop_oldest(entries)
        entries[key] = entry
        return kept

    def _answer(self, key: tuple[str, str], entry: Denial, now: float, patience: float,
                probe: bool = True) -> Decision | None:
        if now >= entry.stale or now >= entry.until:
            self._entries.pop(key, None)
            return None
        if now >= entry.due and not entry.asked:
            if probe:
                entry.asked = True   # this request asks the store; its answer renews the entry
            return None
        if entry.until - now <= patience:
            return None
        return aged(entry.decision, now - entry.replied, entry.honest - now)


def _drop_oldest(table: OrderedDict[Any, Any]) -> None:
    """The oldest entry out; under gthread workers another thread may have emptied the
    table since its length was read, and a refusal must never fail on that."""
    with suppress(KeyError):
        table.popitem(last=False)


def aged(decision: Decision, elapsed: float, wait: float) -> Decision:
    """``decision`` as it reads ``elapsed`` seconds later: every layer's reset that much
    nearer, and ``wait`` left (for Retry-After and the RateLimit headers' t=)."""
    states = tuple(LayerState(s.layer, s.remaining, max(0.0, s.reset - elapsed))
                   for s in decision.states)
    refused = decision.refused
    if refused is not None:
        refused = next((s for s, old in zip(states, decision.states, strict=True)
                        if old is refused), LayerState(refused.layer, refused.remaining,
                                                       max(0.0, refused.reset - elapsed)))
    return Decision(False, states, refused, wait, decision.policy_header)
