"""Who is asking: the client IP for the edge (the names of users' keys: core/naming.py)."""

from __future__ import annotations

from flask import request


def client_ip() -> str:
    """The peer address; ProxyFix (TRUSTED_PROXIES hops) has already rewritten it if trusted."""
    return request.remote_addr or "unknown"
