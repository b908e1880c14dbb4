"""Operators' overrides (``flask limits set``) in the store, and each worker's copy of them.

The store holds one hash, ``<ns>{overrides}``: field ``<realm>:<user>`` -> the override as
JSON, the field ``~version``, bumped after every change, and ``~deny``, bumped by ``limits
reset`` (usage forgotten: every worker's deny cache, limiting/deny.py, must ask again). A
worker asks for the version at most once a second, on a request that comes due (no timer
thread, and no store round trip on the other requests); only when it moved does it read the
hash again. So a request that starts
a second or more after ``limits set`` returned is decided by the new plan, in every worker;
either field moving also clears the worker's deny cache (``StoreOverrides.listeners``).

Expiry (``--for``) is in the store's clock: a worker turns ``expires_at`` into a deadline on
its own monotonic clock when it reads the hash, so worker clocks never decide it.

Imports nothing from redis at module level: gunicorn's master uses ``changed`` (the audit
line) before gevent patches the workers.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from .core.override import Override, derive
from .core.policy import Plan, Policy

if TYPE_CHECKING:
    from .stores.store import Store

REFRESH_SECONDS = 1.0
VERSION = "~version"   # no realm starts with "~", so no user's field can be this one
DENY = "~deny"

log = logging.getLogger("limiter.overrides")
audit_log = logging.getLogger("limiter.audit")

Who = tuple[str, str]   # (realm, user)


def changed(action: str, user: str | None, before: object, after: object) -> None:
    """Every change of limits (override set/cleared, policy reload accepted/refused) as one
    JSON line; the audit trail takes these over."""
    body = {"event": "limits_changed", "action": action, "user": user,
            "before": before, "after": after}
    audit_log.warning(json.dumps(body, default=str), extra={"event": body})


class OverrideTable:
    """The overrides in the store: read, written and cleared by whole records."""

    def __init__(self, store: Store, namespace: str = "rl:") -> None:
        self.key = f"{namespace}{{overrides}}"
        self.store = store

    def version(self) -> int:
        """The overrides' version plus the deny epoch: moves whenever either does, in one
        read (both only ever grow)."""
        return sum(int(value or 0) for value in self.store.hash_fields(self.key, [VERSION, DENY]))

    def bump_deny(self) -> None:
        """Usage was forgotten (``limits reset``): every worker's deny cache asks again."""
        self.store.hash_add(self.key, DENY, 1)

    def now(self) -> float:
        """The store's clock, in seconds: the one clock every worker agrees on."""
        return self.store.now()

    def load(self) -> tuple[int, float, dict[Who, Override]]:
        """Version, the store's time and every override, read together."""
        raw = self.store.hashes([self.key])[0]
        now = self.now()
        version = 0
        records: dict[Who, Override] = {}
        for name, value in raw.items():
            if name in (VERSION, DENY):
                version += int(value)
                continue
            realm, _, user = name.partition(":")
            override = Override.from_json(value)
            if override is not None:
                records[(realm, user)] = override
        return version, now, records

    def put(self, realm: str, user: str, override: Override) -> None:
        # The record first, then the version: a worker that sees the new version sees it.
        self.store.hash_set(self.key, {f"{realm}:{user}": override.to_json()})
        self.store.hash_add(self.key, VERSION, 1)

    def remove(self, realm: str, user: str) -> bool:
        removed = self.store.hash_delete(self.key, f"{realm}:{user}")
        if removed:
            self.store.hash_add(self.key, VERSION, 1)
        return removed


class StoreOverrides:
    """One worker's copy of the overrides, and the plans made from them (``PlanOverrides``).

    A derived plan is kept until its override or its base plan changes, so the engine, which
    keeps compiled plans by name and identity, compiles it once.
    """

    def __init__(self, table: OverrideTable, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.table = table
        self._clock = clock
        self._version: int | None = None
        self._due = 0.0
        self._warned = False
        # (realm, user) -> (override, deadline on self._clock or None)
        self._active: dict[Who, tuple[Override, float | None]] = {}
        self._derived: dict[Who, tuple[Plan, Plan]] = {}
        # Called after every read that found a new version (the deny cache's clear).
        self.listeners: list[Callable[[], None]] = []

    def plan_for(self, user: str, realm: str, plan: Plan, plans: Mapping[str, Plan]) -> Plan:
        now = self._clock()
        if now >= self._due:
            self._due = now + REFRESH_SECONDS   # before the read: one greenlet reads, not all
            self.refresh()
        if not self._active:
            return plan
        who = (realm, user)
        found = self._active.get(who)
        if found is None or (found[1] is not None and now >= found[1]):
            return plan
        cached = self._derived.get(who)
        if cached is not None and cached[0] is plan:
            return cached[1]
        derived = derive(plan, found[0], plans, f"{realm}:{user}")
        self._derived[who] = (plan, derived)
        return derived

    def refresh(self, force: bool = False) -> None:
        """Read the overrides again if their version moved (``force``: read them anyway).
        A store that does not answer leaves the last copy in force: an override is a change
        of limits, never a reason to fail a request."""
        try:
            if not force and self._version is not None \
                    and self.table.version() == self._version:
                return
            version, store_now, records = self.table.load()
        except Exception as exc:   # the store away, a damaged field: never a failed request
            if not self._warned:
                self._warned = True
                log.warning("overrides not refreshed (kept the last copy): %s", exc)
            return
        self._warned = False
        local = self._clock()
        self._active = {
            who: (o, None if o.expires_at is None else local + o.expires_at - store_now)
            for who, o in records.items()
            if o.expires_at is None or o.expires_at > store_now}
        self._derived = {}
        self._version = version
        for listener in self.listeners:
            listener()


def attach(policy: Policy, store: Store) -> Policy:
    """``policy`` with the store's overrides applied by ``resolve``."""
    return replace(policy, overrides=StoreOverrides(OverrideTable(store)))


def on_change(policy: Policy, listener: Callable[[], None]) -> None:
    """Call ``listener`` whenever this worker reads changed overrides or a ``limits reset``
    (nothing to watch without store overrides: then never)."""
    if isinstance(policy.overrides, StoreOverrides):
        policy.overrides.listeners.append(listener)
