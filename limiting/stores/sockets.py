"""Redis connections that wait for their reply in the OS, not in gevent's event loop.

A decision is one ~50 µs round trip to a local Redis. Yielding to gevent's hub for it costs
more than it saves, and worse: in a busy worker the greenlet is resumed only after every
other ready greenlet has run, so a 50 ms budget measured our own queue, not the store, and
turned CPU saturation into spurious timeouts (and 503s from fail_closed layers). With the
OS socket the budget is the store's real latency; the price is that a worker waits, alone,
for that round trip, and for at most the budget while the store is away (then the breaker
opens). Outside gevent the sockets are already the OS's and nothing changes.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from redis.connection import Connection, UnixDomainSocketConnection


def gevent_patched() -> bool:
    """True in a gevent worker (sockets monkey-patched): requests run as greenlets."""
    if "gevent" not in sys.modules:
        return False
    from gevent import monkey

    return bool(monkey.is_module_patched("socket"))


def os_socket(sock: Any) -> Any:
    """The same connected socket as a plain OS socket, if gevent had wrapped it."""
    if not gevent_patched():
        return sock
    from gevent import monkey

    original: type[socket.socket] = monkey.get_original("socket", "socket")
    if isinstance(sock, original) and type(sock) is original:
        return sock
    timeout = sock.gettimeout()
    plain = original(sock.family, sock.type, sock.proto, fileno=sock.detach())
    plain.settimeout(timeout)
    return plain


# redis-py (pinned 8.1.0) has no public hook between opening a socket and handing it to its
# parser, so these override the private ``_connect``; tests/test_private_apis.py checks it.
class OSSocketConnection(Connection):
    def _connect(self) -> Any:
        return os_socket(super()._connect())  # type: ignore[no-untyped-call]


class OSSocketUnixConnection(UnixDomainSocketConnection):
    def _connect(self) -> Any:
        return os_socket(super()._connect())  # type: ignore[no-untyped-call]
