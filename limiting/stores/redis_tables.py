"""The narrow Store methods on Redis/Valkey (RedisStore's base): keys, overrides, the ledger and
the audit trail, each one command off the hot path, every error leaving as StoreUnavailable."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from ..core.codec import as_text, decode_key
from .errors import STORE_ERRORS_CAUGHT, StoreUnavailable

T = TypeVar("T")


class RedisTables:
    """Store's narrow methods over ``client`` (a Redis or a Cluster client)."""

    if TYPE_CHECKING:
        client: Any

        def run(self, name: str, keys: list[str], args: Any) -> Any: ...

    def _redis(self, command: Callable[[Any], T]) -> T:
        """Run one command off the hot path; every Redis error leaves as StoreUnavailable."""
        try:
            return command(self.client)
        except STORE_ERRORS_CAUGHT as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def now(self) -> float:
        seconds, micros = self._redis(lambda c: c.time())
        return float(seconds) + float(micros) / 1e6

    def record(self, key: str) -> dict[str, str]:
        # A script, so the lookup travels like every other call on the hot path: through
        # the breaker, and under gevent in a shared round trip.
        return decode_key(self.run("key", [key], []))

    def hashes(self, keys: list[str]) -> list[dict[str, str]]:
        if not keys:
            return []

        def fetch(c: Any) -> list[Any]:
            # Single-key commands only: a Cluster pipeline sends each to its slot.
            pipe = c.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            return pipe.execute()  # type: ignore[no-any-return]

        return [{as_text(k): as_text(v) for k, v in raw.items()} for raw in self._redis(fetch)]

    def hash_fields(self, key: str, fields: list[str]) -> list[str | None]:
        raw = self._redis(lambda c: c.hmget(key, fields))
        return [None if v is None else as_text(v) for v in raw]

    def hash_set(self, key: str, fields: Mapping[str, str]) -> None:
        self._redis(lambda c: c.hset(key, mapping=dict(fields)))

    def hash_claim(self, key: str, field: str, value: str) -> bool:
        return bool(self._redis(lambda c: c.hsetnx(key, field, value)))

    def hash_add(self, key: str, field: str, amount: int) -> int:
        return int(self._redis(lambda c: c.hincrby(key, field, amount)))

    def hash_delete(self, key: str, field: str) -> bool:
        return bool(self._redis(lambda c: c.hdel(key, field)))

    def ranking(self, key: str, n: int) -> list[tuple[str, float]]:
        if n <= 0:
            return []
        raw = self._redis(lambda c: c.zrevrange(key, 0, n - 1, withscores=True))
        return [(as_text(m), float(s)) for m, s in raw]

    def claim(self, key: str) -> bool:
        return bool(self._redis(lambda c: c.set(key, 1, nx=True)))

    def log_append(self, key: str, fields: Mapping[str, str], keep: int) -> None:
        # A stream: the id is the store's clock, and MAXLEN ~ trims whole nodes cheaply.
        self._redis(lambda c: c.xadd(key, dict(fields), maxlen=keep, approximate=True))

    def log_since(self, key: str, since_ms: int, limit: int
                  ) -> list[tuple[int, dict[str, str]]]:
        raw = self._redis(lambda c: c.xrevrange(key, "+", f"{since_ms}-0", count=limit))
        return [(int(as_text(sid).split("-")[0]), {as_text(k): as_text(v) for k, v in f.items()})
                for sid, f in reversed(raw)]
