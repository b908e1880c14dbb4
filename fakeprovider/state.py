"""Runtime knobs and the request log, shared by the test thread and the event loop.

Tests flip knobs from their own thread while the server's loop reads them, so
every access goes through one ``threading.Lock``; critical sections are tiny
and never await, so the loop is not held up.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .meter import Meter
from .ratelimit import OVERRIDE_KEYS, Refusal, Snapshot, Windows


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or None when the body was empty or not JSON
    raw_body: bytes = field(repr=False, default=b"")


@dataclass(frozen=True)
class Failure:
    """An injected error for the next request."""

    status: int
    retry_after: float | None = None
    retry_after_ms: int | None = None


@dataclass(frozen=True)
class Billing:
    """How the fake counts prompts and which service tier it serves at.

    ``tokenizer``: bill prompts by a real tokenizer (:mod:`fakeprovider.render`), not words.
    ``auto_tier``: the tier a request without one (or with ``auto``) is served at, as a project
    default or Anthropic's priority capacity would; None: the standard tier. ``tiers``: price
    multipliers by tier name; a tier not listed bills at 1.0.
    """

    tokenizer: bool = False
    auto_tier: str | None = None
    tiers: Mapping[str, float] = field(default_factory=dict)


class State:
    """All mutable server state; every method is thread-safe."""

    def __init__(self, delay: float = 0.0, chunk_delay: float = 0.0, rpm: int | None = None,
                 tpm: int | None = None, max_logged: int = 10_000,
                 prices: Mapping[str, Mapping[str, float]] | None = None,
                 tokenizer: bool = False) -> None:
        self._lock = threading.Lock()
        self.meter = Meter(prices)  # its own lock: billing never waits on the knobs
        self._defaults = (delay, chunk_delay, rpm, tpm)
        self._tokenizer = tokenizer
        self._log: deque[RecordedRequest] = deque(maxlen=max_logged)
        self._max_logged = max_logged
        self._clear(delay, chunk_delay, rpm, tpm)

    def _clear(self, delay: float, chunk_delay: float, rpm: int | None, tpm: int | None) -> None:
        self.delay = _non_negative("delay", delay)
        self.chunk_delay = _non_negative("chunk_delay", chunk_delay)
        self._windows = Windows(_positive_or_none("rpm", rpm), _positive_or_none("tpm", tpm))
        self._failures: deque[Failure] = deque()
        self._disconnects = 0
        self._overrides: dict[str, float] = {}
        self._cached = (0, 0)
        self.billing = Billing(self._tokenizer)

    # --- knobs (called from any thread) ---------------------------------------------------------
    def reset(self) -> None:
        """Constructor settings: no injected faults, fresh windows, empty log and meter."""
        with self._lock:
            self._clear(*self._defaults)
            self._log.clear()
        self.meter.reset(prices=True)

    def set_delay(self, seconds: float) -> None:
        """Seconds to wait before answering each admitted request."""
        with self._lock:
            self.delay = _non_negative("delay", seconds)

    def set_chunk_delay(self, seconds: float) -> None:
        """Seconds to wait between streamed words."""
        with self._lock:
            self.chunk_delay = _non_negative("chunk_delay", seconds)

    def set_limits(self, rpm: int | None = None, tpm: int | None = None) -> None:
        """Change enforced limits (None = report defaults, enforce nothing); opens fresh windows."""
        with self._lock:
            self._windows = Windows(_positive_or_none("rpm", rpm), _positive_or_none("tpm", tpm))

    def fail_next(self, status: int, count: int = 1, retry_after: float | None = None,
                  retry_after_ms: int | None = None) -> None:
        """Answer the next ``count`` API requests with ``status`` and the provider's error body."""
        if not 400 <= status <= 599:
            raise ValueError(f"status must be 4xx or 5xx, got {status}")
        with self._lock:
            self._failures.extend(
                Failure(status, retry_after, retry_after_ms) for _ in range(count)
            )

    def disconnect_mid_stream(self, count: int = 1) -> None:
        """Close the TCP connection after the first content chunk of the next ``count`` streams."""
        with self._lock:
            self._disconnects += count

    def set_ratelimit_headers(
        self,
        *,
        limit_requests: int | None = None,
        limit_tokens: int | None = None,
        remaining_requests: int | None = None,
        remaining_tokens: int | None = None,
        reset_requests: float | None = None,
        reset_tokens: float | None = None,
    ) -> None:
        """Report these values instead of the real ones (resets in seconds).

        Each call replaces earlier overrides; no arguments clears them.
        """
        given = (limit_requests, limit_tokens, remaining_requests, remaining_tokens,
                 reset_requests, reset_tokens)  # in the order of OVERRIDE_KEYS
        with self._lock:
            self._overrides = {
                k: v for k, v in zip(OVERRIDE_KEYS, given, strict=True) if v is not None
            }

    def set_service_tier(self, auto: str | None = None,
                         tiers: Mapping[str, float] | None = None) -> None:
        """Serve requests without a tier (or ``auto``) at ``auto``; bill tiers by ``tiers``."""
        with self._lock:
            self.billing = Billing(self._tokenizer, auto, dict(tiers or {}))

    def set_cached_tokens(self, read: int, creation: int = 0) -> None:
        """Report ``read`` prompt tokens as cache hits (``creation`` as cache writes, Anthropic)."""
        with self._lock:
            self._cached = (max(0, int(read)), max(0, int(creation)))

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of the request log, oldest first."""
        with self._lock:
            return list(self._log)

    # --- used by the server (event-loop thread) -------------------------------------------------
    def record(self, request: RecordedRequest) -> None:
        if self._max_logged:
            with self._lock:
                self._log.append(request)

    def take_failure(self) -> Failure | None:
        with self._lock:
            return self._failures.popleft() if self._failures else None

    def take_disconnect(self) -> bool:
        with self._lock:
            if self._disconnects > 0:
                self._disconnects -= 1
                return True
            return False

    def timings(self) -> tuple[float, float]:
        with self._lock:
            return self.delay, self.chunk_delay

    def cached(self) -> tuple[int, int]:
        with self._lock:
            return self._cached

    def admit(self, input_tokens: int, output_tokens: int) -> tuple[Refusal | None, Snapshot]:
        """Charge the windows if the request fits; return any refusal and the quota after."""
        with self._lock:
            refusal = self._windows.admit(input_tokens, output_tokens)
            return refusal, self._windows.snapshot(self._overrides)

    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._windows.snapshot(self._overrides)


def _non_negative(name: str, value: float) -> float:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return float(value)


def _positive_or_none(name: str, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value
