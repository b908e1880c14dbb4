"""Quota windows: "N per unit" texts, and the calendar month the scripts count in.

Every window is a strict sliding one ("100 per day", "5000 per week": at most N in any
7 days), except "N per month": a calendar month in UTC, because bills and provider quotas
run by calendar month and no user expects "this month" to mean "the last 30 days". A
month's count starts at 0 at 00:00:00 UTC on the 1st.

The month is worked out from the store's clock in lua/acquire.lua (which carries its own
copy of the arithmetic) and here for memory:// and the headers; tests/test_properties.py
holds the two to the same answers, February and 31-day months included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from limits import parse_many
from limits.errors import ConfigurationError as LimitsConfigurationError

WEEK = 7 * 86400
# A calendar month's longest length: what the policy says a month window may span.
MONTH = 31 * 86400
_UNIT_NAMES = {1: "second", 60: "minute", 3600: "hour", 86400: "day", WEEK: "week"}
# limits knows no weeks, and its "month" is 30 days: both are read here first.
_OWN = re.compile(r"^\s*(\d+)\s*(?:per|/)\s*(\d+)?\s*(week|month)s?\s*$", re.IGNORECASE)
_DAY_US = 86_400_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Window:
    """At most ``amount`` units in any window of ``seconds`` (a strict sliding window), or,
    with ``calendar``, in each calendar month (UTC)."""

    amount: int
    seconds: int
    text: str
    calendar: bool = False

    @property
    def name(self) -> str:
        if self.calendar:
            return "quota-month"
        unit = _UNIT_NAMES.get(self.seconds)
        return f"quota-{unit}" if unit else f"quota-{self.seconds}s"


def parse_window(text: str, own_units: bool = True) -> Window:
    """``text`` ("100 per day", "5000 per week", "20000 per month") as a Window.

    ``own_units`` False reads it as Flask-Limiter does (the edge's strings): no weeks, and
    a month of 30 days. Raises ValueError with the reason, for the policy reader to name
    file and key."""
    own = _OWN.match(text) if own_units else None
    if own:
        amount, count, unit = int(own[1]), int(own[2] or 1), own[3].lower()
        if unit == "month" and count != 1:
            raise ValueError(f"{text!r}: a month window is one calendar month ('N per "
                             "month'); for a longer sliding window count days")
        if amount < 1:
            raise ValueError(f"{text!r} must allow at least 1")
        if unit == "month":
            return Window(amount, MONTH, text, calendar=True)
        return Window(amount, count * WEEK, text)
    try:
        items = parse_many(text)
    except (LimitsConfigurationError, ValueError) as exc:
        raise ValueError(f"{text!r} is not a rate like '100 per day' ({exc})") from None
    if len(items) != 1:
        raise ValueError(f"{text!r} must be exactly one rate")
    item = items[0]
    if item.amount < 1:
        raise ValueError(f"{text!r} must allow at least 1")
    return Window(amount=item.amount, seconds=item.get_expiry(), text=text)


def month_bounds(now_us: int) -> tuple[int, int, int]:
    """(month number, start µs, end µs) of the UTC calendar month holding ``now_us``.

    The month number (year * 12 + month - 1) is what a month key stores: a count left from
    another month is a count of 0 now."""
    day = datetime.fromordinal(_EPOCH.toordinal() + now_us // _DAY_US)
    start = day.replace(day=1)
    end = (start + timedelta(days=32)).replace(day=1)
    epoch = _EPOCH.replace(tzinfo=None)
    return (start.year * 12 + start.month - 1, (start - epoch).days * _DAY_US,
            (end - epoch).days * _DAY_US)
