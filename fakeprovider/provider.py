"""``FakeProvider``: the fake server on its own event loop in a daemon thread.

Tests use synchronous SDK clients, so the server must run beside them rather
than on their loop; knobs are plain thread-safe method calls.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from .app import App
from .meter import MeterReading
from .server import HTTPServer
from .state import RecordedRequest, State


class FakeProvider:
    """A local fake of the OpenAI and Anthropic HTTP APIs.

    >>> with FakeProvider(delay=0.1) as fp:
    ...     client = openai.OpenAI(base_url=fp.url + "/v1", api_key="k")
    """

    def __init__(
        self,
        delay: float = 0.0,
        chunk_delay: float = 0.0,
        rpm: int | None = None,
        tpm: int | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_logged: int = 10_000,
        prices: Mapping[str, Mapping[str, float]] | None = None,
        tokenizer: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``tokenizer``: bill prompts by a real tokenizer where one is installed
        (:mod:`fakeprovider.render`), not by words. ``tls``: a server context to serve https
        with, as the real providers do."""
        self.state = State(delay, chunk_delay, rpm, tpm, max_logged=max_logged, prices=prices,
                           tokenizer=tokenizer)
        self.host = host
        self.port = port
        self.tls = tls
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: HTTPServer | None = None
        self._stopped: asyncio.Event | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321`` (OpenAI clients add ``/v1``)."""
        if self._server is None:
            raise RuntimeError("FakeProvider is not started")
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def start(self) -> FakeProvider:
        """Start serving; returns once the socket is listening."""
        if self._thread is not None:
            raise RuntimeError("FakeProvider already started")
        ready = threading.Event()
        errors: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(ready, errors), name="fakeprovider", daemon=True
        )
        self._thread.start()
        ready.wait()
        if errors:
            self._thread.join()
            self._thread = None
            raise errors[0]
        return self

    def stop(self) -> None:
        """Close every connection and the listening socket; waits for the thread."""
        if self._thread is None or self._loop is None or self._stopped is None:
            return
        self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout=10)
        self._thread = None
        self._server = None

    def _run(self, ready: threading.Event, errors: list[BaseException]) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopped = asyncio.Event()
            server = HTTPServer(App(self.state))
            try:
                self.port = await server.start(self.host, self.port, self.tls)
            except BaseException as exc:  # report bind errors to start()
                errors.append(exc)
                ready.set()
                return
            self._server = server
            ready.set()
            await self._stopped.wait()
            await server.close()

        asyncio.run(main())

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- knobs (thread-safe; see State for details) ---------------------------------------------
    def fail_next(self, status: int, count: int = 1, retry_after: float | None = None,
                  retry_after_ms: int | None = None) -> None:
        """Next ``count`` API requests get ``status`` and the provider's error body.

        ``retry_after`` / ``retry_after_ms`` add those headers verbatim when given.
        """
        self.state.fail_next(status, count, retry_after, retry_after_ms)

    def disconnect_mid_stream(self, count: int = 1) -> None:
        """Next ``count`` streamed replies drop the TCP connection after the first content chunk."""
        self.state.disconnect_mid_stream(count)

    def set_delay(self, seconds: float) -> None:
        """Seconds before each admitted request is answered."""
        self.state.set_delay(seconds)

    def set_chunk_delay(self, seconds: float) -> None:
        """Seconds between streamed words."""
        self.state.set_chunk_delay(seconds)

    def set_limits(self, rpm: int | None = None, tpm: int | None = None) -> None:
        """Enforce new per-minute limits (None = unenforced defaults) from fresh windows."""
        self.state.set_limits(rpm, tpm)

    def set_ratelimit_headers(self, **overrides: Any) -> None:
        """Report fixed limit/remaining/reset values; see :meth:`State.set_ratelimit_headers`."""
        self.state.set_ratelimit_headers(**overrides)

    def set_service_tier(self, auto: str | None = None,
                         tiers: Mapping[str, float] | None = None) -> None:
        """Serve requests without a tier (or ``auto``) at ``auto`` and report it; bill each
        tier at its multiplier in ``tiers`` (see :class:`fakeprovider.state.Billing`)."""
        self.state.set_service_tier(auto, tiers)

    def set_cached_tokens(self, read: int, creation: int = 0) -> None:
        """Report this many prompt tokens as cache reads (and Anthropic cache writes)."""
        self.state.set_cached_tokens(read, creation)

    def reset(self) -> None:
        """Constructor settings and prices again, no pending faults or overrides, fresh windows,
        empty log and meter."""
        self.state.reset()

    # --- the bill meter (see the fakeprovider docstring for what counts) -----------------------
    def set_prices(self, prices: Mapping[str, Mapping[str, float]] | None) -> None:
        """Replace the price table, ``{"model": {"input", "output", "cached_input",
        "cache_write"}}`` in USD per million tokens, for requests accepted from now on."""
        self.state.meter.set_prices(prices)

    def meter(self) -> MeterReading:
        """What the fake has billed so far: totals, ``by_model`` and ``by_key``."""
        return self.state.meter.reading()

    def reset_meter(self) -> None:
        """Zero the meter (prices stay); requests still generating bill into the new totals."""
        self.state.meter.reset()

    def quiesce(self, timeout: float | None = 10.0) -> bool:
        """Wait until no request is in progress, so :meth:`meter` is final; False on timeout.

        Counts requests the server has read; bytes still in a socket are not in progress yet.
        """
        return self.state.meter.quiesce(timeout)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Received requests, oldest first (method, path, query, headers, body, raw_body)."""
        return self.state.requests
