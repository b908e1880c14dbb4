"""The upstream guard: per model, shared by every user, paced to the provider's own limits.

Two parts: our own requests/tokens-per-minute windows from ``[models."…"]``, and pacing
learnt from the provider's rate-limit headers (and retry-after on 429/529), stored in Redis
so every worker slows down before the provider starts refusing.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime

from .identity import user_tag
from .layers import Layer, window
from .policy import ModelPolicy

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def model_prefix(namespace: str, model: str) -> str:
    return f"{namespace}{{m:{user_tag(model)}}}:"


def guard_layers(model: ModelPolicy | None) -> tuple[Layer, ...]:
    layers: list[Layer] = []
    if model is not None and model.requests_per_minute:
        layers.append(window("upstream-requests", "rpm", model.requests_per_minute, 60,
                             "fail_open"))
    if model is not None and model.tokens_per_minute:
        layers.append(window("upstream-tokens", "tpm", model.tokens_per_minute, 60, "fail_open",
                             wide=True))
    layers.append(Layer("upstream-pace", "p", "pace", 0, 0, 60, "fail_open"))
    return tuple(layers)


def parse_duration(text: str) -> float | None:
    """OpenAI's reset durations: "6m0s", "1.5s", "12ms", "1h2m3s" → seconds."""
    text = text.strip()
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        try:
            return max(0.0, float(text))
        except ValueError:
            return None
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _until(text: str) -> float | None:
    """Anthropic's resets: RFC 3339 times → seconds from now (by this worker's clock)."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0.0, moment.timestamp() - time.time())


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None else None
    except ValueError:
        return None


def pacing_args(headers: Mapping[str, str], status: int) -> list[int] | None:
    """observe.lua's arguments from one provider response, or None if it said nothing."""
    h = {k.lower(): v for k, v in headers.items()}
    rl = _int(h.get("x-ratelimit-remaining-requests"))
    tl = _int(h.get("x-ratelimit-remaining-tokens"))
    rr = parse_duration(h["x-ratelimit-reset-requests"]) if "x-ratelimit-reset-requests" in h \
        else None
    tr = parse_duration(h["x-ratelimit-reset-tokens"]) if "x-ratelimit-reset-tokens" in h \
        else None
    if rl is None and "anthropic-ratelimit-requests-remaining" in h:
        rl = _int(h.get("anthropic-ratelimit-requests-remaining"))
        rr = _until(h.get("anthropic-ratelimit-requests-reset", ""))
    if tl is None:
        for family in ("tokens", "input-tokens", "output-tokens"):
            left = _int(h.get(f"anthropic-ratelimit-{family}-remaining"))
            if left is not None and (tl is None or left < tl):
                tl = left
                tr = _until(h.get(f"anthropic-ratelimit-{family}-reset", ""))
    hold = 0.0
    if status in (429, 529, 503):
        if "retry-after-ms" in h:
            hold = (_int(h["retry-after-ms"]) or 0) / 1000
        elif "retry-after" in h:
            hold = float(_int(h["retry-after"]) or 0)
        hold = hold or 1.0
    if rl is None and tl is None and not hold:
        return None

    def us(seconds: float | None) -> int:
        return -1 if seconds is None else int(seconds * 1_000_000)

    return [rl if rl is not None and rr is not None else -1, us(rr),
            tl if tl is not None and tr is not None else -1, us(tr), us(hold)]


class Observer:
    """Provider headers written behind the request, off the path to the first byte.

    Routine observations are coalesced per model (the latest wins) and written by one
    background thread (a greenlet under gevent) every ``interval``; a 429/529 hold is written
    at once, since every worker should stop calling that provider now.
    """

    def __init__(self, write: Callable[[str, list[int]], None], interval: float = 0.05) -> None:
        self._write = write
        self._interval = interval
        self._lock = threading.Lock()
        self._pending: dict[str, list[int]] = {}
        self._wake = threading.Event()
        self._pid = 0

    def submit(self, model: str, headers: Mapping[str, str], status: int) -> None:
        args = pacing_args(headers, status)
        if args is None:
            return
        if args[4] > 0:
            self._write(model, args)
            return
        with self._lock:
            self._pending[model] = args
        if self._pid != os.getpid():   # first use in this (possibly forked) process
            self._pid = os.getpid()
            threading.Thread(target=self._run, name="pacing-writer", daemon=True).start()
        self._wake.set()

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, {}
        for model, args in batch.items():
            self._write(model, args)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(self._interval)
            self._wake.clear()
            self.flush()
