"""The two things a reservation's life needs besides the store: a lease kept alive while the
upstream thinks, and the rule that says whether a failed call was billed.

Core module: no Flask, redis or SDK import. Exceptions from httpx and the SDKs are recognised
by shape (an int ``status_code``, an explicit ``billed``, class names in the cause chain).
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Protocol

log = logging.getLogger("limiter.reservation")

# A lease must hear from us at least every 2 * RENEW_EVERY seconds: check-config refuses a
# lease_ttl_seconds shorter than that, so one late renewal never frees a live call's slot.
RENEW_EVERY = 5.0

# The limiter's own refusals: raised before anything went upstream.
_OURS = frozenset({"RateLimited", "LimiterUnavailable", "UpstreamSaturated", "ExceedsLimit",
                   "StoreUnavailable"})
# httpx's "no connection was ever made" (DNS failure and refused connections are ConnectError).
_NEVER_CONNECTED = frozenset({"ConnectError", "ConnectTimeout"})
# Provider answers that refuse before generating: 4xx (429 included) and "overloaded".
_REFUSED_STATUSES = frozenset({503, 529})


def status_billed(status: int) -> bool:
    """Was an HTTP error answer from the provider billed? Only a refusal before generation
    (4xx, 503, 529) certainly was not."""
    return not (400 <= status < 500 or status in _REFUSED_STATUSES)


def provider_billed(exc: BaseException) -> bool:
    """Whether the provider may have billed the call that ended in ``exc``.

    False only when it certainly did not: the exception says ``billed = False``, it is an
    HTTP refusal before generation, no connection was ever made, or it is one of the
    limiter's own refusals. Anything else (timeouts, read errors, a client that hung up, 5xx,
    an unknown failure) may have cost money, so it is True.
    """
    billed = getattr(exc, "billed", None)
    if isinstance(billed, bool):
        return billed
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and not isinstance(status, bool):
        return status_billed(status)
    if any(cls.__name__ in _OURS for cls in type(exc).__mro__):
        return False
    # The SDKs raise APIConnectionError/APITimeoutError *from* the httpx error.
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, (ConnectionRefusedError, socket.gaierror)) or any(
                cls.__name__ in _NEVER_CONNECTED for cls in type(seen).__mro__):
            return False
        seen = seen.__cause__ or seen.__context__
    return True


class Renewable(Protocol):
    def renew(self) -> None: ...


class KeepAlive:
    """Renews a lease every ``every`` seconds until stopped: a thread (a greenlet under
    gevent), as an upstream may think silently for longer than a lease lives."""

    def __init__(self, reservation: Renewable, every: float = RENEW_EVERY) -> None:
        self.reservation, self.every = reservation, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keepalive", daemon=True)

    def start(self) -> KeepAlive:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.reservation.renew()
            except Exception:
                log.warning("lease renew failed", exc_info=True)
