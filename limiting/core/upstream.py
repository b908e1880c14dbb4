"""The upstream guard: per model, shared by every user, paced to the provider's own limits.

Two parts: our own requests/tokens-per-minute windows from ``[models."…"]``, and pacing
learnt from the provider's rate-limit headers (and retry-after on 429/529), stored in Redis
so every worker slows down before the provider starts refusing.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from .capacity import ceiling, guard_limit, shard_share
from .codec import PACE_COUNTS, PACE_HOLD, PACE_REQUESTS, PACE_TOKENS, Kind, pace_args
from .flushing import Flusher
from .layers import Layer, window
from .naming import user_tag
from .policy import ECHO, OVERRIDDEN, ModelPolicy

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def model_prefix(namespace: str, model: str, shard: int | None = None) -> str:
    """The guard's keys' prefix; a shard's has a hash tag of its own (its own Cluster slot)."""
    tag = user_tag(model) if shard is None else f"{user_tag(model)}:{shard}"
    return f"{namespace}{{m:{tag}}}:"


def guard_layers(name: str, model: ModelPolicy | None, plan: str | None = None,
                 shard: int = 0) -> tuple[Layer, ...]:
    """The model's guard: its own windows from ``[models."…"]``, then the pacing learnt from
    its provider's headers. A model answered in this process (the built-in echo, provider
    "echo") has no provider to pace to: with no windows of its own it has no guard at all.

    ``plan`` (None: no plan, as a usage page reads it) fills the windows up to its ceiling:
    all but the shares ``reserve`` keeps for other plans. ``shard``: which of the model's
    ``shards`` the windows are, each with its part of the limits."""
    layers: list[Layer] = []
    if model is not None:
        part = ceiling(model.reserve, None if plan is None else plan.partition(OVERRIDDEN)[0])
        for layer_name, suffix, limit, unit in (
                ("upstream-requests", "rpm", model.requests_per_minute, "requests"),
                ("upstream-tokens", "tpm", model.tokens_per_minute, "tokens")):
            if limit:
                a = guard_limit(limit, model.shards, shard, part) if plan is not None \
                    else shard_share(limit, model.shards, shard)
                layers.append(window(layer_name, suffix, a, 60, "fail_open", unit))
    if model is not None and model.mode == "shadow":
        # Our own windows only: the pacing learnt from the provider holds what it would refuse.
        layers = [replace(layer, shadow=True) for layer in layers]
    in_process = model.provider == ECHO if model is not None else name == ECHO
    if not in_process:
        layers.append(Layer("upstream-pace", Kind.PACE, "pace", 0, 0, 60, "fail_open", "pace"))
    return tuple(layers)


# Bounds for anything a provider's headers say: a count a double holds exactly, a reset
# within a day. Past them a value is the provider's (or a proxy's) mistake, not advice.
MAX_COUNT = 2**53
MAX_SECONDS = 86_400.0
DEFAULT_MAX_HOLD = 60.0

# Signals in a provider's error that it refused this one request, not the limit all share.
_TOO_LARGE = re.compile(r"request too large|request_too_large|exceeds? the maximum|"
                        r"too large for", re.IGNORECASE)
_LIMIT_REQUESTED = re.compile(r"Limit:? ([\d,]+).*?Requested:? ([\d,]+)", re.IGNORECASE)
_LIMIT_HEADERS = ("x-ratelimit-limit-tokens", "anthropic-ratelimit-tokens-limit")


def _seconds(value: float) -> float | None:
    """A duration the guard can use: finite, at least 0, at most a day (else unknown)."""
    if not math.isfinite(value) or value < 0:
        return None
    return min(value, MAX_SECONDS)


def parse_duration(text: str) -> float | None:
    """OpenAI's reset durations: "6m0s", "1.5s", "12ms", "1h2m3s" → seconds (None: unusable)."""
    text = text.strip()
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        try:
            return _seconds(float(text))
        except ValueError:
            return None
    return _seconds(sum(float(n) * _UNITS[u] for n, u in parts))


def _until(text: str) -> float | None:
    """Anthropic's resets: RFC 3339 times → seconds from now (by this worker's clock)."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        return _seconds(max(0.0, moment.timestamp() - time.time()))
    except (ValueError, OverflowError, OSError):
        return None


def _int(value: str | None) -> int | None:
    """A count from a header: finite and at least 0, kept to 2**53; anything else is unknown."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    if not math.isfinite(number) or number < 0:
        return None
    return int(min(number, MAX_COUNT))


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The provider's retry-after-ms or retry-after, in seconds within a day; None when
    absent or unusable (an HTTP date, garbage, a negative or non-finite number)."""
    h = {k.lower(): v for k, v in headers.items()}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        if name in h:
            try:
                seconds = _seconds(float(h[name]) * scale)
            except ValueError:
                seconds = None  # an HTTP date or garbage: the other header, or the default
            if seconds is not None:
                return seconds
    return None


def pacing_args(headers: Mapping[str, str], status: int,
                max_hold: float = DEFAULT_MAX_HOLD) -> list[int] | None:
    """observe.lua's arguments from one provider response, or None if it said nothing.

    A 429/503/529 holds the model for the provider's retry-after (1 s when it gave none),
    never longer than ``max_hold``: a provider asking for an hour would stop every user.
    Callers pass a refusal about one request alone (too large for the provider's limit) as
    the 413 it is, so it holds nobody.
    """
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
        cap = max_hold if math.isfinite(max_hold) and max_hold > 0 else DEFAULT_MAX_HOLD
        hold = min(retry_after(h) or 1.0, cap)
    if rl is None and tl is None and not hold:
        return None

    def us(seconds: float | None) -> int:
        return -1 if seconds is None else int(seconds * 1_000_000)

    return pace_args(rl if rl is not None and rr is not None else -1, us(rr),
                     tl if tl is not None and tr is not None else -1, us(tr), us(hold))


def announced_token_limit(headers: Mapping[str, str]) -> int | None:
    """The tokens per minute the provider's headers say the key has, if they say it."""
    h = {k.lower(): v for k, v in headers.items()}
    limits = [n for n in (_int(h.get(name)) for name in _LIMIT_HEADERS) if n]
    return min(limits) if limits else None


def _error_fields(body: Any) -> tuple[str, str]:
    """(message, type and code) of a provider error body, in either provider's shape."""
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        body = body["error"]   # Anthropic's SDK keeps the envelope, OpenAI's drops it
    if not isinstance(body, Mapping):
        return (body if isinstance(body, str) else ""), ""
    message = body.get("message")
    labels = " ".join(str(body.get(k) or "") for k in ("type", "code"))
    return (message if isinstance(message, str) else ""), labels


def refused_alone(status: int, headers: Mapping[str, str], body: Any, tokens: int) -> bool:
    """Whether the provider refused this request for being too large by itself.

    Such a refusal is about this request alone: no wait makes it pass and it says nothing
    about the limit every caller shares. Signs: a 413; an error that says so (OpenAI's
    "Request too large for ...", or "Limit N ... Requested M" with M over N; Anthropic's
    request_too_large); or a 429 for a request larger than the token limit the provider's
    own headers announce.
    """
    if status == 413:
        return True
    if status not in (400, 429):
        return False
    message, labels = _error_fields(body)
    if "request_too_large" in labels or _TOO_LARGE.search(message):
        return True
    if status != 429:
        return False
    found = _LIMIT_REQUESTED.search(message)
    if found:
        limit, requested = (int(g.replace(",", "")) for g in found.groups())
        if requested > limit:
            return True
    announced = announced_token_limit(headers)
    return announced is not None and tokens > announced


class Observer:
    """Provider headers written behind the request, off the path to the first byte.

    Routine observations are coalesced per model (the latest wins) and written by one
    background thread (a greenlet under gevent) every ``interval``. Written at once: a hold
    (every worker should stop calling that provider now) and a provider that says nothing is
    left (no request, or fewer tokens than this call used), so the very next call waits.
    """

    def __init__(self, write: Callable[[str, list[int]], None], interval: float = 0.05,
                 max_hold: Callable[[str], float] | None = None) -> None:
        self._write = write
        self._max_hold = max_hold or (lambda model: DEFAULT_MAX_HOLD)
        self._lock = threading.Lock()
        self._pending: dict[str, list[int]] = {}
        self._writer = Flusher("pacing-writer", interval, self.flush)

    def submit(self, model: str, headers: Mapping[str, str], status: int,
               tokens: int = 0) -> None:
        args = pacing_args(headers, status, self._max_hold(model))
        if args is None:
            return
        requests_left, tokens_left = args[PACE_REQUESTS], args[PACE_TOKENS]
        if args[PACE_HOLD] > 0 or 0 <= requests_left < 1 or 0 <= tokens_left < max(1, tokens):
            with self._lock:
                self._forget_older(model, args)
            self._write(model, args)
            return
        with self._lock:
            self._pending[model] = args
        self._writer.wake()

    def _forget_older(self, model: str, args: list[int]) -> None:
        """What the waiting observation says about the same counts is older: drop it, so
        the writer does not put back a remaining count the provider has since used up."""
        pending = self._pending.get(model)
        if pending is None:
            return
        for left in PACE_COUNTS:
            if args[left] >= 0:
                pending[left:left + 2] = [-1, -1]
        if all(pending[left] < 0 for left in PACE_COUNTS):
            del self._pending[model]

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, {}
        for model, args in batch.items():
            self._write(model, args)
