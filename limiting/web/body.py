"""Request bodies read whole, within a deadline and a size limit, before the app sees them.

gevent's workers time out only the reading of headers: a client sending one body byte every
0.9 s holds a connection (and under sync workers, a worker) as long as it likes. This WSGI
middleware buffers the body first, with a deadline for the whole of it, and answers
``408 {"code": "request_timeout"}`` with ``Connection: close`` when it passes. A chunked body
(no Content-Length, so werkzeug can only cut it off mid-read) over the size limit is handed
on as too long, so the app answers its usual 413. A buffering proxy in front (nginx's
default) still does this better: the worker never sees a slow client at all.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext, suppress
from typing import Any

from ..stores.sockets import gevent_patched
from .context import StartResponse, WSGIApp

READ_STEP = 64 * 1024
DRAIN_BYTES = 8 * 1024 * 1024   # read and dropped past the limit, for a clean 413


class _Expired(Exception):
    """The body's deadline passed (raised inside a read by gevent's timer)."""


class BodyDeadline:
    """``app.wsgi_app = BodyDeadline(app.wsgi_app, timeout=10, max_bytes=1 << 20)``."""

    def __init__(self, app: WSGIApp, timeout: float = 10.0, max_bytes: int = 1024 * 1024
                 ) -> None:
        self.app = app
        self.timeout = timeout
        self.max_bytes = max_bytes

    def __call__(self, environ: dict[str, Any], start_response: StartResponse
                 ) -> Iterable[bytes]:
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        length = _content_length(environ)
        if not chunked and not length:
            return self.app(environ, start_response)    # no body to wait for
        if not chunked and length is not None and length > self.max_bytes + DRAIN_BYTES:
            # Far too long to be worth reading: the app's 413, and the connection closes.
            _abandon(environ, start_response)
            return self.app(environ, start_response)
        try:
            # Only a server that ends the stream itself (gunicorn; any for chunked bodies)
            # may be read to its end; others, never past Content-Length.
            bounded = chunked or bool(environ.get("wsgi.input_terminated"))
            data, ended = self._read(environ, None if bounded else length)
        except (_Expired, TimeoutError, OSError):
            _abandon(environ, start_response)
            return _request_timeout(start_response)
        if not ended:
            _abandon(environ, start_response)
        # Over the limit, the length alone makes werkzeug answer 413 when the view reads.
        environ["CONTENT_LENGTH"] = str(len(data))
        environ["wsgi.input"] = io.BytesIO(data if len(data) <= self.max_bytes else b"")
        environ.pop("HTTP_TRANSFER_ENCODING", None)      # the length above now holds
        return self.app(environ, start_response)

    def _read(self, environ: dict[str, Any], length: int | None) -> tuple[bytes, bool]:
        """The body (past max_bytes, only its first max_bytes + 1 bytes) and whether it
        ended. A body over the limit is read on, and dropped, up to DRAIN_BYTES more, so
        the 413 reaches a client still sending instead of a reset connection.

        Under gevent (the default workers) one timer around the whole read cuts a client
        that stops or trickles. Elsewhere each read sets the socket's timeout to what is
        left, which cuts a client that stops (gunicorn's reader loops over recv() inside one
        read, so a trickling client is cut only at the next read).
        Raises _Expired or TimeoutError at the deadline of a body within the limit."""
        stream = environ["wsgi.input"]
        timer = self._timer()
        # gevent's timer bounds the whole read; without it each read's socket timeout must.
        sock = environ.get("gunicorn.socket") if isinstance(timer, nullcontext) else None
        prior = sock.gettimeout() if sock is not None else None
        deadline = time.monotonic() + self.timeout if self.timeout > 0 else None
        keep = self.max_bytes + 1
        parts: list[bytes] = []
        total = 0
        try:
            with timer:
                while total < self.max_bytes + DRAIN_BYTES:
                    if deadline is not None and sock is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise _Expired()
                        sock.settimeout(left)
                    step = READ_STEP if length is None else min(READ_STEP, length - total)
                    part = stream.read(step) if step > 0 else b""
                    if not part:
                        return b"".join(parts), True
                    if total < keep:
                        parts.append(part[:keep - total])
                    total += len(part)
        except (_Expired, TimeoutError, OSError):
            if total <= self.max_bytes:
                raise
        finally:
            if sock is not None:
                # Responses (streams to slow readers included) keep the server's timeout.
                with suppress(OSError):
                    sock.settimeout(prior)
        return b"".join(parts), False

    def _timer(self) -> AbstractContextManager[Any]:
        if self.timeout <= 0 or not gevent_patched():
            return nullcontext()
        import gevent

        timer: AbstractContextManager[Any] = gevent.Timeout(self.timeout, _Expired)
        return timer


def _content_length(environ: dict[str, Any]) -> int | None:
    try:
        return max(0, int(environ.get("CONTENT_LENGTH") or ""))
    except ValueError:
        return None


def _abandon(environ: dict[str, Any], start_response: StartResponse) -> None:
    """The rest of the body stays unread: the connection must close after this response,
    as where the next request starts is unknown (gunicorn otherwise drains it unbounded)."""
    body: Any = environ.get("wsgi.input")
    if hasattr(body, "failed"):
        body.failed = True                 # gunicorn's Body: do not reuse the connection
    response = getattr(start_response, "__self__", None)
    force_close = getattr(response, "force_close", None)
    if callable(force_close):
        force_close()                      # gunicorn then says Connection: close itself


def _request_timeout(start_response: StartResponse) -> list[bytes]:
    payload = json.dumps({"error": "The request body did not arrive in time.",
                          "code": "request_timeout"}).encode()
    start_response("408 Request Timeout", [("Content-Type", "application/json"),
                                           ("Content-Length", str(len(payload))),
                                           ("Connection", "close")])
    return [payload]

