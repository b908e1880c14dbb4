"""Typed access to the policy file's TOML tables, reporting every problem as file: key: reason.

A bad file must fail at start, naming file, key and reason, because a typo found by the first
paying user is a typo found too late.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from .windows import Window, parse_window

FailMode = Literal["fail_open", "fail_closed"]
FAIL_MODES: tuple[FailMode, ...] = ("fail_open", "fail_closed")
Mode = Literal["enforce", "shadow"]
MODES: tuple[Mode, ...] = ("enforce", "shadow")


class PolicyError(ValueError):
    """The policy file is unusable; the message names file, key and reason."""


class TableReader:
    """One TOML table: typed reads, and ``done()`` refuses the keys nobody read (typos)."""

    def __init__(self, source: str, prefix: str, table: Any) -> None:
        self.source, self.prefix = source, prefix
        if not isinstance(table, dict):
            self.fail("", "must be a table")
        self.table: dict[str, Any] = table
        self.seen: set[str] = set()

    def fail(self, key: str, reason: str) -> None:
        where = ".".join(p for p in (self.prefix, key) if p)
        raise PolicyError(f"{self.source}: {where or '(top level)'}: {reason}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, *,
            required: bool = False) -> Any:
        self.seen.add(key)
        if key not in self.table:
            if required:
                self.fail(key, "is required")
            return default
        value = self.table[key]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            self.fail(key, f"must be {_kind_name(kind)}, not a boolean")
        if not isinstance(value, kind):
            self.fail(key, f"must be {_kind_name(kind)}, got {type(value).__name__} {value!r}")
        return value

    def positive(self, key: str, kind: type | tuple[type, ...] = int, *, required: bool = False,
                 default: Any = None) -> Any:
        value = self.get(key, kind, default, required=required)
        if value is not None and not (value > 0 and math.isfinite(value)):
            self.fail(key, f"must be a positive number, got {value!r}")
        return value

    def seconds(self, key: str, ceiling: float) -> float:
        """Seconds from 0 to ``ceiling`` (default 0)."""
        value = float(self.get(key, (int, float), 0))
        if not (0 <= value <= ceiling):   # nan fails both
            self.fail(key, f"must be a number of seconds from 0 to {ceiling:g}, got {value!r}")
        return value

    def price(self, key: str) -> float | None:
        """Dollars: zero is free; below zero or not finite is a typo that bills wrong."""
        value = self.get(key, (int, float))
        if value is None:
            return None
        if not (math.isfinite(value) and value >= 0):
            self.fail(key, f"must be a finite number >= 0, got {value!r}")
        return float(value)

    def multipliers(self, key: str) -> dict[str, float]:
        """A table of positive, finite factors (e.g. service tiers' price multipliers)."""
        table = self.get(key, dict, {})
        for name, factor in table.items():
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) \
                    or not (math.isfinite(factor) and factor > 0):
                self.fail(f"{key}.{name}", f"must be a positive price multiplier, got {factor!r}")
        return {name: float(factor) for name, factor in table.items()}

    def fail_mode(self, key: str, default: FailMode) -> FailMode:
        value = self.get(key, str, default)
        if value not in FAIL_MODES:
            self.fail(key, f"must be one of {', '.join(FAIL_MODES)}, got {value!r}")
        return value  # type: ignore[no-any-return]

    def mode(self) -> Mode:
        """``mode``: "enforce" (the default) or "shadow" (log and count, never refuse)."""
        value = self.get("mode", str, "enforce")
        if value not in MODES:
            self.fail("mode", f"must be one of {', '.join(MODES)}, got {value!r}")
        return value  # type: ignore[no-any-return]

    def window(self, key: str, text: str, own_units: bool = True) -> Window:
        """One "N per unit" text, parsed (a bad one fails naming ``key``)."""
        try:
            return parse_window(text, own_units)
        except ValueError as exc:
            self.fail(key, str(exc))
            raise   # unreachable: fail raises

    def windows(self, key: str, distinct: bool = True) -> tuple[Window, ...]:
        """A list of "N per unit" texts; ``distinct``: no two of one window length."""
        out = []
        for i, text in enumerate(self.get(key, list, [])):
            if not isinstance(text, str):
                self.fail(f"{key}[{i}]", f"must be a string like '100 per day', got {text!r}")
            out.append(self.window(f"{key}[{i}]", text))
        lengths = [(w.seconds, w.calendar) for w in out]
        if distinct and len(set(lengths)) != len(lengths):
            self.fail(key, "two quotas share one window length; keep the tighter one")
        return tuple(out)

    def shares(self, key: str) -> tuple[float, ...]:
        """A list of shares in (0, 1], e.g. ``alert_at = [0.8, 1.0]``: sorted, distinct."""
        values = self.get(key, list, [])
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                self.fail(f"{key}[{i}]", f"must be a share in (0, 1], like 0.8; got {v!r}")
        return tuple(sorted({float(v) for v in values}))

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            self.fail(unknown[0], "unknown key (a typo?)")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a table", bool: "true or false"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)
