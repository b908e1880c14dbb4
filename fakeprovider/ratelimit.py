"""The fake's own per-minute limits and the provider-style header values.

Real providers report their quota on every response and answer 429 with
``retry-after`` when it runs out; the limiter paces itself from those headers,
so the fake keeps honest one-minute fixed windows for requests and tokens.
Without ``rpm``/``tpm`` it reports large limits (10,000 rpm, 2,000,000 tpm)
whose remaining counts still fall honestly, but it never refuses on them (a
benchmark may well exceed them). With ``rpm``/``tpm`` set it refuses.

Not thread-safe by itself: :class:`fakeprovider.state.State` holds the lock.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

DEFAULT_RPM = 10_000
DEFAULT_TPM = 2_000_000
WINDOW_SECONDS = 60.0

OVERRIDE_KEYS = (
    "limit_requests",
    "limit_tokens",
    "remaining_requests",
    "remaining_tokens",
    "reset_requests",
    "reset_tokens",
)


@dataclass(frozen=True)
class Snapshot:
    """Quota as reported to the client; resets are seconds from now."""

    limit_requests: int
    remaining_requests: int
    reset_requests: float
    limit_tokens: int
    remaining_tokens: int
    reset_tokens: float
    remaining_input_tokens: int
    remaining_output_tokens: int


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused and when the window frees up."""

    kind: str  # "requests" or "tokens"
    limit: int
    used: int
    requested: int
    retry_after: float


class Windows:
    """One-minute fixed windows for requests and input/output tokens."""

    def __init__(
        self, rpm: int | None, tpm: int | None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self._clock = clock
        self._start: float | None = None
        self.requests = 0
        self.input_tokens = 0
        self.output_tokens = 0

    def _roll(self, now: float) -> None:
        if self._start is not None and now >= self._start + WINDOW_SECONDS:
            self._start = None
            self.requests = self.input_tokens = self.output_tokens = 0

    def _reset_in(self, now: float) -> float:
        return 0.0 if self._start is None else max(0.0, self._start + WINDOW_SECONDS - now)

    def admit(self, input_tokens: int, output_tokens: int) -> Refusal | None:
        """Charge one request if it fits; otherwise return why not (charging nothing)."""
        now = self._clock()
        self._roll(now)
        cost = input_tokens + output_tokens
        used_tokens = self.input_tokens + self.output_tokens
        if self.rpm is not None and self.requests + 1 > self.rpm:
            return Refusal("requests", self.rpm, self.requests, 1, self._retry_after(now))
        if self.tpm is not None and used_tokens + cost > self.tpm:
            return Refusal("tokens", self.tpm, used_tokens, cost, self._retry_after(now))
        if self._start is None:
            self._start = now
        self.requests += 1
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        return None

    def _retry_after(self, now: float) -> float:
        # A refusal with no open window (a request larger than the limit) still waits a window.
        return self._reset_in(now) if self._start is not None else WINDOW_SECONDS

    def snapshot(self, overrides: dict[str, float] | None = None) -> Snapshot:
        """Current quota, with any test overrides applied on top."""
        now = self._clock()
        self._roll(now)
        rpm = self.rpm if self.rpm is not None else DEFAULT_RPM
        tpm = self.tpm if self.tpm is not None else DEFAULT_TPM
        reset = self._reset_in(now)
        snap = Snapshot(
            limit_requests=rpm,
            remaining_requests=max(0, rpm - self.requests),
            reset_requests=reset,
            limit_tokens=tpm,
            remaining_tokens=max(0, tpm - self.input_tokens - self.output_tokens),
            reset_tokens=reset,
            remaining_input_tokens=max(0, tpm - self.input_tokens),
            remaining_output_tokens=max(0, tpm - self.output_tokens),
        )
        if overrides:
            snap = apply_overrides(snap, overrides)
        return snap


def apply_overrides(snap: Snapshot, overrides: dict[str, float]) -> Snapshot:
    """Replace reported values; token overrides also set the input/output ones."""
    changes: dict[str, float | int] = {}
    for key, value in overrides.items():
        changes[key] = float(value) if key.startswith("reset_") else int(value)
    if "remaining_tokens" in changes:
        changes["remaining_input_tokens"] = changes["remaining_tokens"]
        changes["remaining_output_tokens"] = changes["remaining_tokens"]
    return replace(snap, **changes)  # type: ignore[arg-type]


def format_duration(seconds: float) -> str:
    """Format like OpenAI's reset headers (Go durations): "12ms", "1s", "6m0s", "1m30.5s"."""
    total_ms = max(0, round(seconds * 1000))
    if total_ms == 0:
        return "0s"
    if total_ms < 1000:
        return f"{total_ms}ms"
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, ms = divmod(rest, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    out = f"{secs}s"
    if hours or minutes:
        out = f"{minutes}m" + out
    if hours:
        out = f"{hours}h" + out
    return out


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str) -> float:
    """Inverse of :func:`format_duration` (seconds); raises ValueError on junk."""
    if not text or _DURATION_PART.sub("", text):
        raise ValueError(f"not a duration: {text!r}")
    factor = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(num) * factor[unit] for num, unit in _DURATION_PART.findall(text))


def rfc3339_after(seconds: float, now: float | None = None) -> str:
    """UTC timestamp ``seconds`` from now, rounded up to the second, like Anthropic's resets."""
    base = time.time() if now is None else now
    moment = datetime.fromtimestamp(math.ceil(base + max(0.0, seconds)), tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def retry_after_headers(seconds: float) -> list[tuple[str, str]]:
    """``retry-after`` (whole seconds, >= 1) and ``retry-after-ms``."""
    return [
        ("retry-after", str(max(1, math.ceil(seconds)))),
        ("retry-after-ms", str(max(1, math.ceil(seconds * 1000)))),
    ]
