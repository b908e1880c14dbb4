"""Alerts before the wall: which thresholds a decision crossed, the event it makes, and the
signature a webhook receiver checks (the way Stripe signs its webhooks).

Exactly one event per (subject, layer, threshold, window) is the store's to keep (one
``SET NX`` per crossing, limiting/alerts.py); this module only says which crossings a
decision may have made, cheaply, so a request that crossed nothing costs nothing more.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

SIGNATURE_HEADER = "X-Limiter-Signature"
EVENT_TYPE = "limit.threshold"
# Layers whose use an operator budgets: quotas, token and dollar windows (kinds of
# core/layers.py); a bucket refills too fast to warn about, a lease is not a budget.
BUDGET_KINDS = frozenset({"w", "W", "m"})


@dataclass(frozen=True, slots=True)
class Used:
    """One layer's state after a decision, as alerting needs it."""

    layer: str          # its name, as a 429 body says it
    kind: str
    limit: float
    window: int         # seconds
    remaining: float    # after this request
    cost: float         # what this request added (0: it added nothing)
    reset: float        # seconds until it is back to full


@dataclass(frozen=True, slots=True)
class Crossing:
    """One threshold a subject's use of one layer reached inside one window."""

    subject: str
    realm: str          # "key", "anonymous", "org" or "tag": in words, as operators read them
    layer: str
    threshold: float
    used: int
    limit: int
    resets_at: int      # unix seconds
    window_id: int      # which window of the layer (its start, in window lengths)

    @property
    def once_key(self) -> str:
        """What the store claims once, so every worker and replica sends it once."""
        return f"{self.realm}\x1f{self.subject}\x1f{self.layer}\x1f{self.threshold:g}" \
               f"\x1f{self.window_id}"

    @property
    def event_id(self) -> str:
        """Stable for the crossing: the same across retries and across workers."""
        return "evt_" + hashlib.sha256(self.once_key.encode()).hexdigest()[:24]

    def event(self) -> dict[str, object]:
        return {"id": self.event_id, "type": EVENT_TYPE, "subject": self.subject,
                "realm": self.realm, "layer": self.layer, "threshold": self.threshold,
                "used": self.used, "limit": self.limit, "resets_at": self.resets_at}


def crossings(subject: str, realm: str, states: Iterable[Used], thresholds: Sequence[float],
              now: float) -> list[Crossing]:
    """The thresholds this decision took a layer across: used before < t * limit <= used
    after. A refund that lowers the use and a later request that raises it again cross once
    more; the store's claim (per window) keeps that to one event."""
    found = []
    for s in states:
        if s.kind not in BUDGET_KINDS or s.cost <= 0 or s.limit <= 0:
            continue
        after = s.limit - max(0.0, s.remaining)
        before = after - s.cost
        for t in thresholds:
            mark = t * s.limit
            if before < mark <= after:
                found.append(Crossing(subject, realm, s.layer, t, math.ceil(after),
                                      math.ceil(s.limit), math.ceil(now + s.reset),
                                      int(now // max(1, s.window))))
    return found


def body_of(event: Mapping[str, object]) -> bytes:
    """The exact bytes sent (and signed): compact, keys in order."""
    return json.dumps(event, separators=(",", ":"), sort_keys=True).encode()


def signature(body: bytes, secret: str, at: int) -> str:
    """``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``."""
    mac = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={mac}"


def verify(header: str, body: bytes, secret: str, now: int, tolerance: int = 300) -> bool:
    """What a receiver does: the signature matches and is no older than ``tolerance`` s
    (a replayed old delivery is refused)."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        at = int(parts.get("t", ""))
    except ValueError:
        return False
    expected = signature(body, secret, at).split("v1=", 1)[1]
    return abs(now - at) <= tolerance and hmac.compare_digest(expected, parts.get("v1", ""))
