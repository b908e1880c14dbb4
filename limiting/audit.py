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
import hashlib
import json
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .stores.memory import MemoryStore
from .stores.store import STORE_ERRORS_CAUGHT, RedisStore, Store, StoreUnavailable

MAX_ENTRIES = 10_000
_LOCK = threading.Lock()


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
    return "admin:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _wire(text: str) -> str:
    """Text Redis can take as UTF-8: a name from argv or a body may hold lone surrogates."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def record(store: Store, actor: str, action: str, subject: str, before: Any = None,
           after: Any = None, *, namespace: str = "rl:") -> None:
    """Append one entry (``before``/``after``: text, or anything JSON encodes). Raises
    StoreUnavailable when the store is away: the caller says the change went unaudited."""
    fields = {name: _wire(value) for name, value in (
        ("actor", actor), ("action", action), ("subject", subject),
        ("before", _text(before)), ("after", _text(after)))}
    if isinstance(store, MemoryStore):
        at = int(datetime.now(UTC).timestamp() * 1000)
        with _LOCK:
            log = _memory_log(store)
            log.append((at, fields))
            del log[:-MAX_ENTRIES]
        return
    _redis(store, lambda c: c.xadd(namespace + "audit", fields, maxlen=MAX_ENTRIES,
                                   approximate=True))


def record_reloads(store: Store, folder: Path, namespace: str = "rl:") -> int:
    """Put the policy reloads the gunicorn master noted (limiting.reloading) in the trail,
    each once however many workers start on it; returns how many this call added."""
    from .reloading import noted_reloads

    added = 0
    for event in noted_reloads(folder):
        if _first_time(store, f"{namespace}audit:seen:{event['id']}"):
            record(store, str(event.get("actor") or "signal:HUP"), str(event["action"]),
                   "policy", event.get("before"), event.get("after"), namespace=namespace)
            added += 1
    return added


def _first_time(store: Store, key: str) -> bool:
    if isinstance(store, MemoryStore):
        with _LOCK:
            seen: set[str] = store.table("audit-seen", set)
            if key in seen:
                return False
            seen.add(key)
            return True
    # No expiry: the master's reload file keeps its entries for good, and every worker
    # start replays it; a marker that expired would record an old reload again.
    return bool(_redis(store, lambda c: c.set(key, 1, nx=True)))


class Audit:
    """Reads the trail back, oldest first."""

    def __init__(self, store: Store, namespace: str = "rl:") -> None:
        self.store = store
        self.key = namespace + "audit"

    def read(self, since: datetime | None = None, limit: int = 100) -> list[Entry]:
        """The newest ``limit`` entries after ``since``, oldest first."""
        low = int(since.timestamp() * 1000) if since is not None else 0
        if isinstance(self.store, MemoryStore):
            with _LOCK:
                rows = [(at, dict(f)) for at, f in _memory_log(self.store) if at >= low]
            rows = rows[-limit:]
        else:
            raw = _redis(self.store, lambda c: c.xrevrange(self.key, "+", f"{low}-0",
                                                            count=limit))
            rows = [(int(_s(sid).split("-")[0]), {_s(k): _s(v) for k, v in f.items()})
                    for sid, f in reversed(raw)]
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


def _memory_log(store: MemoryStore) -> list[tuple[int, dict[str, str]]]:
    """memory://'s trail: (ms, fields), oldest first."""
    return store.table("audit", list)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _redis(store: Store, command: Any) -> Any:
    if not isinstance(store, RedisStore):
        raise TypeError(f"the audit trail needs a RedisStore or MemoryStore, not {store!r}")
    try:
        return command(store.client)
    except STORE_ERRORS_CAUGHT as exc:
        raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
