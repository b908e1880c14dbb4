"""The audit trail: who changed a limit or a key, what, before -> after, and when.

One capped stream in the store (``<ns>audit``, XADD MAXLEN ~ MAX_ENTRIES): no second
database, and the oldest entries fall off on their own. The stream id is the store's clock.
Nothing secret goes in: an operator is the shell user or the admin token's id (a digest
prefix), a key is its key_id. Every operator action calls::

    record(store, actor, action, subject, before, after)

e.g. ``record(store, shell_actor(), "limits.set", "alice", {"plan": "starter"},
{"plan": "pro"})``.
"""

from __future__ import annotations

import getpass
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .core.naming import digest, wire_text
from .stores.store import Store

MAX_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class Entry:
    when: str          # ISO 8601, UTC, by the store's clock
    at_ms: int
    actor: str
    action: str
    subject: str
    before: str
    after: str

    def json(self) -> dict[str, Any]:
        return {"when": self.when, "actor": self.actor, "action": self.action,
                "subject": self.subject, "before": self.before, "after": self.after}


def shell_actor() -> str:
    """Who runs a ``flask`` command: the shell user."""
    try:
        return "shell:" + getpass.getuser()
    except (KeyError, OSError):   # no passwd entry, no LOGNAME (containers)
        return "shell:unknown"


def token_actor(token: str) -> str:
    """An admin token's id: a digest prefix, never the token."""
    return "admin:" + digest(token, 12)


def _shown(value: Any) -> str:
    """``before``/``after`` as the trail shows them: text as it is, anything else as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def record(store: Store, actor: str, action: str, subject: str, before: Any = None,
           after: Any = None, *, namespace: str = "rl:") -> None:
    """Append one entry (``before``/``after``: text, or anything JSON encodes). Raises
    StoreUnavailable when the store is away: the caller says the change went unaudited."""
    # A name from argv or a body may hold lone surrogates: stored readable, never refused.
    fields = {name: wire_text(value) for name, value in (
        ("actor", actor), ("action", action), ("subject", subject),
        ("before", _shown(before)), ("after", _shown(after)))}
    store.log_append(namespace + "audit", fields, MAX_ENTRIES)


def record_reloads(store: Store, folder: Path, namespace: str = "rl:") -> int:
    """Put the policy reloads the gunicorn master noted (limiting.reloading) in the trail,
    each once however many workers start on it; returns how many this call added."""
    from .reloading import noted_reloads

    added = 0
    for event in noted_reloads(folder):
        # A marker with no expiry: the master's reload file keeps its entries for good, and
        # every worker start replays it; a marker that expired would record it again.
        if store.claim(f"{namespace}audit:seen:{event['id']}"):
            record(store, str(event.get("actor") or "signal:HUP"), str(event["action"]),
                   "policy", event.get("before"), event.get("after"), namespace=namespace)
            added += 1
    return added


class Audit:
    """Reads the trail back, oldest first."""

    def __init__(self, store: Store, namespace: str = "rl:") -> None:
        self.store = store
        self.key = namespace + "audit"

    def read(self, since: datetime | None = None, limit: int = 100) -> list[Entry]:
        """The newest ``limit`` entries after ``since``, oldest first."""
        low = int(since.timestamp() * 1000) if since is not None else 0
        rows = self.store.log_since(self.key, low, limit)
        return [Entry(datetime.fromtimestamp(at / 1000, UTC).isoformat(timespec="seconds"),
                      at, f.get("actor", ""), f.get("action", ""), f.get("subject", ""),
                      f.get("before", ""), f.get("after", "")) for at, f in rows]


_AGO = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str, now: datetime) -> datetime:
    """``2h``, ``7d``, ``30m``, ``10s`` ago, or an ISO date/time (UTC unless it says)."""
    ago = _AGO.fullmatch(text.strip())
    if ago:
        return now - timedelta(**{_UNITS[ago.group(2)]: int(ago.group(1))})
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since must be like 2h, 7d or 2026-01-31, got {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
