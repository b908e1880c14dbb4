"""Alerts before the wall: one event per crossing, kept in the store's outbox until the
webhook took it.

A request that crossed a threshold (core/alerting.py) claims the crossing once in the store
(``SET NX`` for the window's length), so every worker and replica together make one event;
the event goes to a log line, a counter and, with ``[alerts] webhook_url``, the outbox. A
deliverer in each worker (off the request path) takes due events under a short lease, POSTs
them signed, and retries with backoff for up to an hour, the same ``id`` each time; the
outbox lives in the store, so a restarted worker picks up what another left.
"""

from __future__ import annotations

import json
import logging
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .core.alerting import SIGNATURE_HEADER, Crossing, Used, body_of, crossings, signature
from .core.codec import as_text
from .core.flushing import Flusher
from .core.groups import Role
from .core.naming import REALM_WORDS
from .core.policy import Plan, Policy

log = logging.getLogger("limiter.alerts")

GIVE_UP_AFTER = 3600.0      # seconds from the event: then it is dropped, loudly
LEASE = 30.0                # a deliverer's hold on an event it is sending
POST_TIMEOUT = 5.0
BATCH = 20


class AlertBox(Protocol):
    """What alerts need of a store (limiting/stores/ implements it for each kind)."""

    def claim_once(self, key: str, ttl_ms: int) -> bool:
        """True for exactly one caller per ``key`` until ``ttl_ms`` passes."""

    def outbox_put(self, event_id: str, body: bytes, due: float) -> None: ...

    def outbox_due(self, now: float, lease: float, limit: int
                   ) -> list[tuple[str, bytes, int]]:
        """Up to ``limit`` events due by ``now`` as (id, body, attempts so far), each held
        for ``lease`` seconds so no other deliverer sends it meanwhile."""

    def outbox_done(self, event_id: str) -> None: ...

    def outbox_retry(self, event_id: str, due: float) -> None:
        """Count an attempt and make it due again at ``due``."""


@dataclass(slots=True)
class Delivery:
    """One attempt's outcome, for the log and the tests."""

    event_id: str
    ok: bool
    status: int | None
    attempts: int


Post = Callable[[str, bytes, dict[str, str]], int]


def post_json(url: str, body: bytes, headers: dict[str, str]) -> int:
    """POST ``body``; the HTTP status, or raise OSError (timeouts, refusals)."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=POST_TIMEOUT) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def backoff(attempts: int) -> float:
    """2, 4, 8 … seconds, at most five minutes, with jitter so many events spread out."""
    return min(300.0, 2.0 ** max(1, attempts)) * random.uniform(0.8, 1.2)


class Alerts:
    """Turns crossings into events (once each) and delivers them."""

    def __init__(self, box: AlertBox, webhook_url: str | None, secret: str | None,
                 count: Callable[[Crossing], None] = lambda c: None,
                 post: Post = post_json, clock: Callable[[], float] = time.time) -> None:
        self.box, self.url, self.secret = box, webhook_url, secret
        self.count, self.post, self.clock = count, post, clock
        # Each worker's deliverer: woken by its first decision, then every second.
        self.deliverer = Flusher("alerts", 1.0, self.deliver_due, busy=lambda: True)

    def poll(self) -> None:
        """Keep this worker's deliverer running (cheap once it runs) when there is a
        webhook: it sends what any worker, or a worker before a restart, left due."""
        if self.url:
            self.deliverer.wake()

    def notice(self, found: Iterable[Crossing]) -> int:
        """Make one event of each crossing no one made before; returns how many."""
        made = 0
        for crossing in found:
            ttl_ms = max(1000, int((crossing.resets_at - self.clock()) * 1000) + 60_000)
            # By its digest: a user id in a key name could carry braces (a hash tag).
            if not self.box.claim_once("alert:" + crossing.event_id, ttl_ms):
                continue
            made += 1
            event = {**crossing.event(), "created": int(self.clock())}
            log.warning("alert %s: %s %r reached %g of %s (%s of %s), resets at %s",
                        event["id"], crossing.realm, crossing.subject, crossing.threshold,
                        crossing.layer, crossing.used, crossing.limit, crossing.resets_at)
            self.count(crossing)
            if self.url:
                self.box.outbox_put(crossing.event_id, body_of(event), self.clock())
        return made

    def deliver_due(self) -> list[Delivery]:
        """Send what is due now; called by the worker's periodic loop, never by a request."""
        if not self.url:
            return []
        now = self.clock()
        done = []
        for event_id, body, attempts in self.box.outbox_due(now, LEASE, BATCH):
            done.append(self._send(event_id, body, attempts + 1))
        return done

    def _send(self, event_id: str, body: bytes, attempts: int) -> Delivery:
        assert self.url is not None
        status: int | None = None
        try:
            status = self.post(self.url, body, self.headers(body))
        except OSError as exc:
            log.info("alert %s: webhook attempt %d failed: %s", event_id, attempts, exc)
        if status is not None and 200 <= status < 300:
            self.box.outbox_done(event_id)
            return Delivery(event_id, True, status, attempts)
        if self.clock() - _created(body, self.clock()) >= GIVE_UP_AFTER:
            log.error("alert %s: dropped after %d attempts over an hour (last status %s)",
                      event_id, attempts, status)
            self.box.outbox_done(event_id)
        else:
            self.box.outbox_retry(event_id, self.clock() + backoff(attempts))
        return Delivery(event_id, False, status, attempts)

    def headers(self, body: bytes) -> dict[str, str]:
        """The signature header, when ALERT_WEBHOOK_SECRET is set."""
        if not self.secret:
            return {}
        return {SIGNATURE_HEADER: signature(body, self.secret, int(self.clock()))}


def _created(body: bytes, default: float) -> float:
    """When the event was made: its ``created`` field."""
    try:
        return float(json.loads(body).get("created", default))
    except (ValueError, AttributeError, TypeError):
        return default


class StoreAlertBox:
    """:class:`AlertBox` over any store's ``run`` (lua/alerts.lua; memory:// mirrors it), so a
    registered store that runs the scripts has alerts too. The outbox is one Cluster slot."""

    def __init__(self, store: ScriptRunner, namespace: str) -> None:
        self.store = store
        tagged = f"{namespace}{{alerts}}:"
        self.outbox = [tagged + "outbox", tagged + "events", tagged + "attempts"]
        self.namespace = namespace

    def claim_once(self, key: str, ttl_ms: int) -> bool:
        return bool(self.store.run("alerts", [self.namespace + key], ["once", ttl_ms]))

    def outbox_put(self, event_id: str, body: bytes, due: float) -> None:
        self.store.run("alerts", self.outbox, ["put", event_id, body, int(due * 1000)])

    def outbox_due(self, now: float, lease: float, limit: int
                   ) -> list[tuple[str, bytes, int]]:
        flat = self.store.run("alerts", self.outbox,
                              ["due", int(now * 1000), int(lease * 1000), limit])
        return [(as_text(flat[i]), _bytes(flat[i + 1]), int(flat[i + 2]))
                for i in range(0, len(flat), 3)]

    def outbox_done(self, event_id: str) -> None:
        self.store.run("alerts", self.outbox, ["done", event_id])

    def outbox_retry(self, event_id: str, due: float) -> None:
        self.store.run("alerts", self.outbox, ["retry", event_id, int(due * 1000)])


class ScriptRunner(Protocol):
    def run(self, name: str, keys: list[str], args: Sequence[str | int | float | bytes]
            ) -> Any: ...


def _bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def crossings_of(charged: Iterable[tuple[Any, int, Sequence[tuple[int, int]]]], user: str,
                 realm: str, plan: Plan, org: Plan | None, now: float,
                 tags: Sequence[Plan] = ()) -> list[Crossing]:
    """The thresholds an admitted request crossed, from what the executor charged: the
    user's plan's layers by ``plan.alert_at``, the org's by ``org.alert_at``, each tag
    table's (of ``tags``, in the order their groups were charged) by its own."""
    found: list[Crossing] = []
    tables = iter(tags)
    for group, _at, states in charged:
        if group.role is Role.PLAN and plan.alert_at:
            subject, words, thresholds = user, REALM_WORDS.get(realm, realm), plan.alert_at
        elif group.role is Role.ORG and org is not None and org.alert_at:
            subject, words, thresholds = org.name, "org", org.alert_at
        elif group.role is Role.TAG and (table := next(tables, None)) is not None \
                and table.alert_at:
            subject, words, thresholds = table.name, "tag", table.alert_at
        else:
            continue
        used = [Used(layer.name, layer.kind, layer.limit, layer.window, remaining, cost,
                     reset_us / 1e6)
                for layer, cost, (remaining, reset_us) in zip(group.layers, group.costs, states,
                                                              strict=False)]
        found += crossings(subject, words, used, thresholds, now)
    return found


def alerts_for(store: ScriptRunner, namespace: str, policy: Policy, secret: str | None,
               count: Callable[[Crossing], None] = lambda c: None) -> Alerts | None:
    """The policy's alerts, or None when no plan or org asks for any."""
    wanted = any(p.alert_at for p in (*policy.plans.values(), *policy.orgs.values(),
                                      *policy.tags.values()))
    if not wanted:
        return None
    return Alerts(StoreAlertBox(store, namespace), policy.alert_webhook_url, secret or None,
                  count)
