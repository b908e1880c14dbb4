"""Past one machine: Redis Cluster and Sentinel, named as the limits library names them.

redis+cluster://[:password@]host:port[,host:port...]
redis+sentinel://[:password@]host:port[,host:port...]/service_name
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from .store import RedisStore, redis_options


def _nodes(netloc: str) -> tuple[str | None, list[tuple[str, int]]]:
    password = None
    if "@" in netloc:
        auth, netloc = netloc.rsplit("@", 1)
        password = unquote(auth.split(":", 1)[-1]) or None
    nodes = []
    for part in netloc.split(","):
        host, _, port = part.rpartition(":")
        nodes.append((host or "127.0.0.1", int(port or 6379)))
    return password, nodes


def open_cluster_store(url: str, timeout: float) -> RedisStore:
    parts = urlsplit(url)
    password, nodes = _nodes(parts.netloc)
    options = redis_options(timeout)
    if parts.scheme.endswith("+cluster"):
        client = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in nodes], password=password, **options
        )
        return RedisStore(url, client)
    service = parts.path.strip("/").split("/")[0]
    if not service:
        raise ValueError(f"REDIS_URL {url!r}: name the Sentinel service, as .../mymaster")
    sentinel = Sentinel(nodes, sentinel_kwargs={"socket_timeout": timeout}, password=password,
                        **options)
    return RedisStore(url, sentinel.master_for(service))
