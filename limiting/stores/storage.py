"""The store named by a URL: redis://, rediss://, unix://, their valkey:// spellings,
redis+cluster://, redis+sentinel:// or memory://. Here, apart from the stores themselves, so
that each store module needs only the shared base (limiting/store.py) and none needs another.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

import redis

from .cluster import open_cluster_store
from .memory import MemoryStore
from .sockets import OSSocketConnection, OSSocketUnixConnection
from .store import RedisStore, Store, redis_options

# Opens a store from (url, timeout, max_connections).
Opener = Callable[[str, float, int], Store]


def _memory(url: str, timeout: float, max_connections: int) -> Store:
    return MemoryStore(url)


def _cluster(url: str, timeout: float, max_connections: int) -> Store:
    return open_cluster_store(url, timeout)


# valkey:// spellings and redis+unix:// are redis-py's URLs under another name.
_PLAIN = {"valkey": "redis", "valkeys": "rediss", "redis+unix": "unix", "valkey+unix": "unix"}


def _server(url: str, timeout: float, max_connections: int) -> Store:
    scheme, rest = url.split("://", 1)
    plain = _PLAIN.get(scheme, scheme) + "://" + rest
    # As many connections as a gevent worker has requests (1,000): a request must never
    # wait for a free connection and have that counted against the store.
    options = redis_options(timeout)
    if plain.startswith("unix://"):
        options["connection_class"] = OSSocketUnixConnection
    elif plain.startswith("redis://"):
        options["connection_class"] = OSSocketConnection
    pool = redis.BlockingConnectionPool.from_url(
        plain, max_connections=max_connections, timeout=timeout, **options
    )
    return RedisStore(url, redis.Redis(connection_pool=pool))


OPENERS: dict[str, Opener] = {
    "memory": _memory,
    **dict.fromkeys(("redis+cluster", "valkey+cluster", "redis+sentinel", "valkey+sentinel"),
                    _cluster),
    **dict.fromkeys(("redis", "rediss", "unix", "redis+unix", "valkey", "valkeys",
                     "valkey+unix"), _server),
}


def register_store(scheme: str, opener: Opener) -> None:
    """Serve REDIS_URLs of ``scheme`` with ``opener`` (a store of your own, e.g. in tests)."""
    OPENERS[scheme] = opener


def open_store(url: str, timeout: float = 0.05, max_connections: int = 1024) -> Store:
    """Open the store named by ``url``, by its scheme."""
    scheme = urlsplit(url).scheme
    opener = OPENERS.get(scheme)
    if opener is None:
        raise ValueError(
            f"REDIS_URL {url!r}: unsupported scheme {scheme!r} (use redis://, rediss://, "
            "unix://, redis+cluster://, redis+sentinel:// or memory://)")
    return opener(url, timeout, max_connections)
