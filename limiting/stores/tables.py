"""memory://'s hashes, rankings, logs and markers: what API keys, overrides, the spend ledger
and the audit trail keep, kept as the Redis store keeps them (Store's narrow methods).

They share MemoryStore's one dict and lock with the limits' state, as kinds of their own: "h"
a hash (also the ledger's day counters, which settle writes), "z" a ranking (the ledger's),
"x" a log (the audit trail), "s" a marker. One key name is one thing, as in Redis, and a
name of another kind is refused as Redis refuses it (WRONGTYPE).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..core.codec import as_text
from .store import StoreUnavailable

FOREVER = math.inf   # no expiry: keys, overrides and the audit trail stay until removed


class MemoryTables:
    """The narrow Store methods for memory:// (MemoryStore's base)."""

    if TYPE_CHECKING:
        _lock: threading.Lock
        _data: dict[str, tuple[float, list[Any]]]

        def _now_us(self) -> int: ...

        def _get(self, key: str, now: int) -> list[Any] | None: ...

    def _of(self, key: str, kind: str, now: int, create: bool = False) -> Any:
        """The live value of ``key`` if it is of ``kind`` (None: no such key; made empty,
        with no expiry, when ``create``). Called under the lock."""
        state = self._get(key, now)
        if state is None:
            if not create:
                return None
            state = [kind, [] if kind == "x" else {}]
            self._data[key] = (FOREVER, state)
        if state[0] != kind:
            raise StoreUnavailable(f"WRONGTYPE: {key!r} holds another kind of value")
        return state[1]

    def now(self) -> float:
        return self._now_us() / 1e6

    def record(self, key: str) -> dict[str, str]:
        return self.hashes([key])[0]

    def hashes(self, keys: list[str]) -> list[dict[str, str]]:
        with self._lock:
            now = self._now_us()
            found = [self._of(key, "h", now) or {} for key in keys]
            return [{as_text(k): as_text(v) for k, v in h.items()} for h in found]

    def hash_fields(self, key: str, fields: list[str]) -> list[str | None]:
        with self._lock:
            h = self._of(key, "h", self._now_us()) or {}
            return [None if h.get(f) is None else as_text(h[f]) for f in fields]

    def hash_set(self, key: str, fields: Mapping[str, str]) -> None:
        with self._lock:
            self._of(key, "h", self._now_us(), create=True).update(fields)

    def hash_claim(self, key: str, field: str, value: str) -> bool:
        with self._lock:
            h = self._of(key, "h", self._now_us(), create=True)
            if field in h:
                return False
            h[field] = value
            return True

    def hash_add(self, key: str, field: str, amount: int) -> int:
        with self._lock:
            h = self._of(key, "h", self._now_us(), create=True)
            try:
                h[field] = int(h.get(field, 0)) + amount
            except ValueError:
                raise StoreUnavailable(f"ERR hash value of {field!r} is not an integer"
                                       ) from None
            return int(h[field])

    def hash_delete(self, key: str, field: str) -> bool:
        with self._lock:
            h = self._of(key, "h", self._now_us())
            if h is None or field not in h:
                return False
            del h[field]
            if not h:   # as Redis: a hash with no fields is no key
                del self._data[key]
            return True

    def ranking(self, key: str, n: int) -> list[tuple[str, float]]:
        with self._lock:
            scores = self._of(key, "z", self._now_us()) or {}
            # As ZREVRANGE: score, then member, both descending.
            ordered = sorted(scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
            return [(m, float(s)) for m, s in ordered[:max(0, n)]]

    def claim(self, key: str) -> bool:
        with self._lock:
            if self._get(key, self._now_us()) is not None:
                return False
            self._data[key] = (FOREVER, ["s", "1"])
            return True

    def log_append(self, key: str, fields: Mapping[str, str], keep: int) -> None:
        with self._lock:
            log = self._of(key, "x", self._now_us(), create=True)
            # As a stream's ids: never before the last entry, whatever the clock did.
            at = max(self._now_us() // 1000, log[-1][0] if log else 0)
            log.append((at, dict(fields)))
            del log[:-keep]

    def log_since(self, key: str, since_ms: int, limit: int
                  ) -> list[tuple[int, dict[str, str]]]:
        with self._lock:
            log = self._of(key, "x", self._now_us()) or []
            rows = [(at, dict(f)) for at, f in log if at >= since_ms]
        return rows[-limit:] if limit > 0 else []
