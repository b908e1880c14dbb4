"""A small HTTP/1.1 server on asyncio streams + h11.

Why not a framework: the benchmark needs 1,000+ idle keep-alive connections,
each parked in ``asyncio.sleep`` for the upstream delay, in one process with
little CPU; one coroutine per connection over h11 does that with no extra
dependency. Handlers get a :class:`Request` and an :class:`Exchange` to answer
with a JSON body (Content-Length) or a chunked stream they may cut short.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import h11

log = logging.getLogger("fakeprovider")

MAX_BODY = 8 * 1024 * 1024
READ_SIZE = 65536
Headers = list[tuple[str, str]]


@dataclass(frozen=True)
class Request:
    """A fully read request."""

    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: bytes


class BodyTooLarge(Exception):
    """The request body is over :data:`MAX_BODY`."""


_date_cache: tuple[int, str] = (0, "")
_EXTRA_REASONS = {529: "Site Overloaded"}


def reason(status: int) -> bytes:
    """The reason phrase for a status line (h11 sends an empty one otherwise)."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return _EXTRA_REASONS.get(status, "").encode()


def http_date() -> str:
    """The Date header value, formatted at most once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


class Exchange:
    """The response side of one request on a connection."""

    def __init__(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        reader: asyncio.StreamReader | None = None,
    ) -> None:
        self._conn = conn
        self._writer = writer
        self._reader = reader
        self.started = False
        self.aborted = False

    async def _send(self, event: Any) -> None:
        data = self._conn.send(event)
        if data:
            self._writer.write(data)
            await self._writer.drain()

    def _headers(self, headers: Headers, extra: Headers) -> list[tuple[bytes, bytes]]:
        base = [("date", http_date()), ("server", "fakeprovider")]
        return [(k.encode(), v.encode()) for k, v in base + extra + headers]

    def peer_gone(self) -> bool:
        """Whether the client has already closed or reset the connection.

        The transport keeps reading while a handler waits, so a client that
        timed out and hung up shows as EOF (HTTP clients never half-close).
        """
        if self._writer.is_closing():
            return True
        reader = self._reader
        return reader is not None and (reader.exception() is not None or reader.at_eof())

    async def send_json(self, status: int, headers: Headers, payload: Any) -> None:
        """Send a complete JSON response with Content-Length."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        extra = [("content-type", "application/json"), ("content-length", str(len(body)))]
        self.started = True
        head = self._headers(headers, extra)
        await self._send(h11.Response(status_code=status, headers=head, reason=reason(status)))
        await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())

    async def start_stream(self, status: int, headers: Headers) -> None:
        """Send the head of a chunked ``text/event-stream`` response."""
        extra = [
            ("content-type", "text/event-stream; charset=utf-8"),
            ("cache-control", "no-cache"),
            ("transfer-encoding", "chunked"),
        ]
        self.started = True
        head = self._headers(headers, extra)
        await self._send(h11.Response(status_code=status, headers=head, reason=reason(status)))

    async def send_chunk(self, data: bytes) -> None:
        """Send one chunk of a stream."""
        await self._send(h11.Data(data=data))

    async def end_stream(self) -> None:
        """Send the terminating zero-length chunk."""
        await self._send(h11.EndOfMessage())

    async def abort(self) -> None:
        """Drop the TCP connection mid-response, as a dying upstream would."""
        self.aborted = True
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()
        self._writer.close()


Handler = Callable[[Request, Exchange], Awaitable[None]]


class HTTPServer:
    """Serves ``handler`` on one listening socket until :meth:`close`."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0,
                    tls: ssl.SSLContext | None = None) -> int:
        """Bind and listen (over TLS with ``tls``); returns the bound port."""
        self._server = await asyncio.start_server(
            self._on_connect, host, port, backlog=4096, limit=READ_SIZE, ssl=tls
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        """Stop listening and cancel every open connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=READ_SIZE)
        while True:
            try:
                request = await _read_request(conn, reader, writer)
            except BodyTooLarge:
                await _plain_error(conn, writer, 413, "request body too large")
                return
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _plain_error(conn, writer, 400, f"malformed HTTP request: {exc}")
                return
            if request is None:
                return
            exchange = Exchange(conn, writer, reader)
            try:
                await self._handler(request, exchange)
            except (ConnectionError, asyncio.CancelledError):
                raise
            except Exception:
                log.exception("handler failed for %s %s", request.method, request.path)
                if not exchange.started:
                    await _plain_error(conn, writer, 500, "fake provider bug")
                return
            if (
                exchange.aborted
                or conn.our_state is not h11.DONE
                or conn.their_state is not h11.DONE
            ):
                return
            conn.start_next_cycle()


async def _read_request(
    conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> Request | None:
    """Read one whole request, or None when the client closed between requests."""
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if conn.they_are_waiting_for_100_continue:  # curl does this for bodies > 1 KiB
                writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            conn.receive_data(await reader.read(READ_SIZE))
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise BodyTooLarge
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return _to_request(head, bytes(body))
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None


def _to_request(head: h11.Request, body: bytes) -> Request:
    headers: dict[str, str] = {}
    for name, value in head.headers:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    target = head.target.decode("latin-1")
    path, _, query = target.partition("?")
    return Request(head.method.decode("ascii"), path, query, headers, body)


async def _plain_error(
    conn: h11.Connection, writer: asyncio.StreamWriter, status: int, message: str
) -> None:
    """A last-resort JSON error that closes the connection."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    with contextlib.suppress(h11.LocalProtocolError, ConnectionError):
        writer.write(
            conn.send(h11.Response(status_code=status, headers=headers, reason=reason(status)))
        )
        writer.write(conn.send(h11.Data(data=body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
