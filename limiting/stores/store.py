"""Where limiter state lives, picked by URL scheme, with every backend error mapped here.

redis://, rediss://, unix:// and redis+unix:// reach one server; memory:// keeps state in this
process (dev servers only); redis+cluster:// and redis+sentinel:// are handled in cluster.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from ..metrics import STORE_ERRORS
from .breaker import Breaker
from .errors import STORE_ERRORS_CAUGHT as STORE_ERRORS_CAUGHT
from .errors import StoreUnavailable as StoreUnavailable
from .pipelining import Direct, Pipeliner
from .redis_tables import RedisTables
from .scripts import script_source
from .sockets import gevent_patched

ScriptArgs = Sequence[str | int | float | bytes]
T = TypeVar("T")




# Error replies that mean the node cannot serve us now (a failover, a replica), unlike an
# error about one call (a key of the wrong type): those count toward the circuit breaker.
_NOT_SERVING = (redis.exceptions.ClusterError, redis.exceptions.AskError,
                redis.exceptions.TryAgainError, redis.exceptions.ReadOnlyError)


class Store(Protocol):
    url: str

    # One server: keys of any hash tag may share one script call, so the edge's (keyed by
    # IP) and the model's guard ride in the user's call. False for a Cluster (and for
    # memory://, which runs no edge layer).
    single_node: bool

    def acquire(self, keys: list[str], args: ScriptArgs) -> list[int]: ...

    def run(self, name: str, keys: list[str], args: ScriptArgs) -> Any: ...

    def ping(self) -> bool: ...

    def delete(self, keys: list[str]) -> int: ...

    def close(self) -> None: ...

    # What API keys, overrides, the spend ledger and the audit trail keep, in as few and as
    # narrow calls as they need: every name and value is text, every failure StoreUnavailable.

    def now(self) -> float:
        """The store's clock, in seconds: the one clock every worker agrees on."""

    def record(self, key: str) -> dict[str, str]:
        """One hash, on a request's hot path (an API key's record); {} when there is none."""

    def hashes(self, keys: list[str]) -> list[dict[str, str]]:
        """Every field of each hash ({} for a missing one), in one round trip per node."""

    def hash_fields(self, key: str, fields: list[str]) -> list[str | None]:
        """Named fields of one hash (None: not set)."""

    def hash_set(self, key: str, fields: Mapping[str, str]) -> None: ...

    def hash_claim(self, key: str, field: str, value: str) -> bool:
        """Set ``field`` only if it is not set yet; whether this call set it."""

    def hash_add(self, key: str, field: str, amount: int) -> int:
        """Add to an integer field (missing: 0); the new value."""

    def hash_delete(self, key: str, field: str) -> bool: ...

    def ranking(self, key: str, n: int) -> list[tuple[str, float]]:
        """A sorted set's ``n`` highest (member, score), score then member descending."""

    def claim(self, key: str) -> bool:
        """Create ``key`` (no expiry) if it does not exist; whether this call created it."""

    def log_append(self, key: str, fields: Mapping[str, str], keep: int) -> None:
        """Append an entry stamped with the store's clock; about ``keep`` newest are kept."""

    def log_since(self, key: str, since_ms: int, limit: int
                  ) -> list[tuple[int, dict[str, str]]]:
        """The newest ``limit`` entries stamped ``since_ms`` or later, as (ms, fields),
        oldest first."""


class RedisStore(RedisTables):
    """One Redis/Valkey (or Cluster) client; scripts go by EVALSHA and reload after NOSCRIPT."""

    def __init__(self, url: str, client: Any) -> None:
        self.url = url
        self.client = client
        # One server holds every key, so the edge's per-IP key can join a user's script call.
        self.single_node = isinstance(client, redis.Redis)
        self._scripts: dict[str, Script] = {}
        self._acquire = self.script("acquire")
        self.breaker = Breaker()
        # On a Cluster one dead master must not open the breaker for every other slot.
        self._node_breakers: dict[str, Breaker] | None = None if self.single_node else {}
        # Picked at the first call: the app may be created before gevent patches sockets.
        self._caller: Direct | Pipeliner | None = None

    def script(self, name: str) -> Script:
        if name not in self._scripts:
            self._scripts[name] = self.client.register_script(script_source(name))
        return self._scripts[name]

    def acquire(self, keys: list[str], args: ScriptArgs) -> list[int]:
        return self._call(self._acquire, keys, args)  # type: ignore[no-any-return]

    def run(self, name: str, keys: list[str], args: ScriptArgs) -> Any:
        return self._call(self.script(name), keys, args)

    def breaker_for(self, key: str) -> Breaker:
        if self._node_breakers is None:
            return self.breaker
        try:
            node = self.client.get_node_from_key(key).name
        except STORE_ERRORS_CAUGHT:
            return self.breaker
        breaker = self._node_breakers.get(node)
        if breaker is None:
            breaker = self._node_breakers[node] = Breaker()
        return breaker

    def _call(self, script: Script, keys: list[str], args: ScriptArgs) -> Any:
        """Every script call goes through here: the breaker, and errors mapped in one place."""
        breaker = self.breaker_for(keys[0]) if keys else self.breaker
        if not breaker.allow():
            STORE_ERRORS.labels("breaker_open").inc()
            raise StoreUnavailable("circuit open: the store failed recently; probing with backoff")
        try:
            if not self.single_node:
                result = script(keys, args)  # redis-py's Cluster client routes it
            else:
                caller = self._caller
                if caller is None:
                    caller = self._caller = (Pipeliner if gevent_patched() else Direct)(
                        self.client)
                result = caller.call(script, keys, args)
        except BaseException as exc:
            if isinstance(exc, redis.ResponseError) and not isinstance(exc, _NOT_SERVING):
                # The store answered (a key of the wrong type, out of memory, ...): it is up,
                # so one user's damaged key must not open the circuit for everyone.
                breaker.success()
            else:
                # Whatever else it was, a probe that did not succeed failed: the breaker
                # must not wait for an answer that never comes.
                breaker.failure()
            if isinstance(exc, STORE_ERRORS_CAUGHT):
                STORE_ERRORS.labels(type(exc).__name__).inc()
                raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
            raise
        breaker.success()
        return result

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except STORE_ERRORS_CAUGHT:
            return False

    def delete(self, keys: list[str]) -> int:
        try:
            # One key at a time: in a Cluster a multi-key DEL must not cross slots.
            return sum(int(self.client.delete(key)) for key in keys)
        except STORE_ERRORS_CAUGHT as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self.client.close()
        if self.single_node:  # a client given its pool leaves the pool's connections open
            self.client.connection_pool.disconnect()


def redis_options(timeout: float) -> dict[str, Any]:
    """Client options shared by every topology: a decision must give up within its budget."""
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # One immediate retry heals a connection the server dropped (restart, failover); a
        # timeout is not retried: the budget is spent, and the failure policy decides.
        "retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        "health_check_interval": 0,
    }


def edge_storage(store: Store) -> tuple[str, dict[str, Any]]:
    """Flask-Limiter's storage URI and options for the same store, sharing its connections."""
    scheme = urlsplit(store.url).scheme
    if scheme == "memory":
        return "memory://", {}
    if isinstance(store, RedisStore) and isinstance(store.client, redis.Redis):
        return "redis://", {"connection_pool": store.client.connection_pool}
    return store.url, {}
