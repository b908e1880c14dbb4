"""The store named by a URL: redis://, rediss://, unix://, their valkey:// spellings,
redis+cluster://, redis+sentinel:// or memory://. Here, apart from the stores themselves, so
that each store module needs only the shared base (limiting/store.py) and none needs another.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import redis

from .cluster import open_cluster_store
from .memory import MemoryStore
from .sockets import OSSocketConnection, OSSocketUnixConnection
from .store import RedisStore, Store, redis_options


def open_store(url: str, timeout: float = 0.05, max_connections: int = 1024) -> Store:
    """Open the store named by ``url``."""
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return MemoryStore(url)
    if scheme in ("redis+cluster", "valkey+cluster", "redis+sentinel", "valkey+sentinel"):
        return open_cluster_store(url, timeout)
    if scheme in ("redis", "rediss", "unix", "redis+unix", "valkey", "valkeys", "valkey+unix"):
        rest = url.split("://", 1)[1]
        plain = {"valkey": "redis", "valkeys": "rediss", "redis+unix": "unix",
                 "valkey+unix": "unix"}.get(scheme, scheme) + "://" + rest
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
    raise ValueError(
        f"REDIS_URL {url!r}: unsupported scheme {scheme!r} (use redis://, rediss://, unix://, "
        "redis+cluster://, redis+sentinel:// or memory://)"
    )
