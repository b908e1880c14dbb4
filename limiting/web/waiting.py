"""Waiting for a future slot: the deadline a request may wait (its plan's max_wait_seconds,
less if the client asks with X-RateLimit-Max-Wait), and the sleep until the slot the store
gave it, watching for a client that hangs up meanwhile.

The slot was taken in the acquire call itself (lua/acquire.lua), so nothing here polls the
store: a waiter sleeps once. Under gevent the sleep costs a greenlet and a socket, nothing
more; a client that hangs up is seen within POLL_SECONDS and its slot given back.
"""

from __future__ import annotations

import math
import re
import select
import socket
import time
from typing import Any

from flask import request
from werkzeug.exceptions import BadRequest, HTTPException

from .. import metrics
from ..core.decision import Decision
from ..core.policy import Plan
from . import logs

HEADER = "X-RateLimit-Max-Wait"
_SECONDS = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")
POLL_SECONDS = 0.25   # how soon a hang-up is seen while waiting


class ClientGone(HTTPException):
    """The client hung up while waiting for its slot; the slot was given back. Nobody reads
    the answer: 499, as nginx logs a client that closed the connection."""

    code = 499
    description = "The client closed the connection while waiting for its slot."


def max_wait(plan: Plan) -> float:
    """Seconds this request may wait: the plan's max_wait_seconds, or less if the client
    asks. A value that is not a number of seconds from 0 up is a 400: a client that meant
    "never wait" must not be left waiting by a typo. More than the plan's is capped."""
    ceiling = plan.max_wait_seconds
    if ceiling <= 0:
        return 0.0   # a plan that never waits: the header asks for nothing (and costs nothing)
    raw = request.headers.get(HEADER)
    if raw is None:
        return ceiling
    # ASCII seconds only: float() also takes "٣", "1_0" and "1e3", which no client means.
    text = raw.strip()
    asked = float(text) if _SECONDS.fullmatch(text) else math.nan
    if not (math.isfinite(asked) and asked >= 0):
        raise BadRequest(f"{HEADER} must be a number of seconds, 0 or more; got {raw[:40]!r}.")
    return min(asked, ceiling)


def wait_for_slot(decision: Decision, user: str) -> bool:
    """Sleep until the slot ``decision`` was admitted into; False if the client hung up
    first (the caller gives the slot back)."""
    delay = decision.delay
    if delay <= 0:
        return True
    served = _sleep(delay, request.environ.get("gunicorn.socket"))
    metrics.count(metrics.WAITS.labels("served" if served else "abandoned"))
    metrics.count(metrics.WAIT_SECONDS, delay)
    logs.event("waited" if served else "abandoned_wait", user=user, waited=round(delay, 3))
    return served


def _sleep(delay: float, sock: Any) -> bool:
    """``time.sleep`` (gevent's, under its worker), in steps that look at the client's
    socket: readable with nothing to read is a hang-up."""
    end = time.monotonic() + delay
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return True
        if sock is None:
            time.sleep(left)
            return True
        try:
            readable, _, _ = select.select([sock], [], [], min(left, POLL_SECONDS))
        except (OSError, ValueError):   # closed under us
            return False
        if not readable:
            continue
        try:
            peeked = sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            return False
        if not peeked:
            return False
        # Bytes waiting (a pipelined request, an unread body): no hang-up to see; sleep on.
        time.sleep(max(0.0, end - time.monotonic()))
        return True
