"""A response as one outcome label: admitted, the refusing layer, a 503 code or error:<status>."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ADMITTED = "admitted"
SKIPPED = "skipped"          # never sent: every connection was busy at its scheduled time

_RATELIMIT_ITEM = re.compile(r'"([^"]+)"\s*;\s*r=(-?\d+)')


@dataclass(frozen=True, slots=True)
class Outcome:
    label: str       # "admitted", "user", "quota-day", "limiter_unavailable", "error:500", ...
    status: int      # HTTP status, 0 when no answer came back


def classify(status: int, body: Any) -> Outcome:
    """200 → admitted; 429 → body["layer"]; 503 → body["code"]; anything else → error:<status>."""
    fields: Mapping[str, Any] = body if isinstance(body, Mapping) else {}
    if status == 200:
        return Outcome(ADMITTED, status)
    if status == 429 and isinstance(fields.get("layer"), str) and fields["layer"]:
        return Outcome(fields["layer"], status)
    if status == 503 and isinstance(fields.get("code"), str) and fields["code"]:
        return Outcome(fields["code"], status)
    return Outcome(f"error:{status}", status)


def transport_error(exc: BaseException) -> Outcome:
    """No HTTP answer: error:timeout, error:connect or error:<ExceptionName>."""
    name = type(exc).__name__
    if "Timeout" in name:
        return Outcome("error:timeout", 0)
    if "Connect" in name:
        return Outcome("error:connect", 0)
    return Outcome(f"error:{name}", 0)


def tightest_remaining(headers: Mapping[str, str], outcome: Outcome) -> tuple[int, str] | None:
    """X-RateLimit-Remaining and the name of the layer it describes, if the response had them.

    On a refusal that layer is the refusing one; otherwise it is the first layer in the
    RateLimit header whose r= equals X-RateLimit-Remaining.
    """
    raw = headers.get("x-ratelimit-remaining")
    if raw is None:
        return None
    try:
        remaining = int(raw)
    except ValueError:
        return None
    if outcome.status == 429:
        return remaining, outcome.label
    for name, r in _RATELIMIT_ITEM.findall(headers.get("ratelimit", "")):
        if int(r) == remaining:
            return remaining, name
    return remaining, "?"


def kind(outcome_status: int, label: str) -> str:
    """The summary's group for a label: admitted, refused, unavailable, error or skipped."""
    if label == ADMITTED:
        return "admitted"
    if label == SKIPPED:
        return "skipped"
    if outcome_status == 429:
        return "refused"
    if outcome_status == 503 and not label.startswith("error:"):
        return "unavailable"
    return "error"
