"""An operator's override of one user's plan (``flask limits set``): what it changes, for how
long, and the Plan it makes, without a store or a web app.

An override plan is the user's plan with a few fields replaced: its layers keep their key
suffixes, so the usage already spent carries over (raising a day quota from 100 to 500 after
90 requests leaves 410, not 500). It gets a name of its own, because the engine keeps one
compiled plan per name: two users' overrides sharing a name would recompile per request.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .policy import OVERRIDDEN, Plan, Policy, unpriced
from .windows import Window, parse_window

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``30m``, ``12h``, ``7d`` (also ``s`` and ``w``) in seconds; a clear ValueError else."""
    found = _DURATION.fullmatch(text)
    seconds = float(found.group(1)) * _UNIT_SECONDS[found.group(2)] if found else 0.0
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(f"bad duration {text!r}: use a positive number and one of s, m, h, d, "
                         "w, e.g. 30m, 12h or 7d")
    return seconds


@dataclass(frozen=True, slots=True)
class Override:
    """What ``limits set`` stored: times are the store's clock (seconds since the epoch)."""

    plan: str | None = None
    quotas: tuple[str, ...] = ()
    budget_usd_per_day: float | None = None
    set_at: float = 0.0
    expires_at: float | None = None   # None: until cleared

    def what(self) -> str:
        """The change in the words of the command that made it."""
        parts = [f"plan={self.plan}"] if self.plan else []
        parts += [f"quota={q!r}" for q in self.quotas]
        if self.budget_usd_per_day is not None:
            parts.append(f"budget_usd_per_day={self.budget_usd_per_day:g}")
        return " ".join(parts)

    def to_json(self) -> str:
        return json.dumps({"plan": self.plan, "quotas": list(self.quotas),
                           "budget_usd_per_day": self.budget_usd_per_day,
                           "set_at": self.set_at, "expires_at": self.expires_at})

    @classmethod
    def from_json(cls, text: str | bytes) -> Override | None:
        """The stored override; None for a damaged one (skipped, never a failed request)."""
        try:
            raw: Any = json.loads(text)
            return cls(plan=raw.get("plan"), quotas=tuple(raw.get("quotas") or ()),
                       budget_usd_per_day=raw.get("budget_usd_per_day"),
                       set_at=float(raw.get("set_at") or 0), expires_at=raw.get("expires_at"))
        except (ValueError, TypeError, AttributeError):
            return None


def check(override: Override, policy: Policy) -> None:
    """Refuse what the policy file would refuse, so a typo fails the command, not a request."""
    if not (override.plan or override.quotas or override.budget_usd_per_day is not None):
        raise ValueError("nothing to set: give --plan, --quota or --budget-usd-per-day")
    if override.plan is not None and override.plan not in policy.plans:
        raise ValueError(f"unknown plan {override.plan!r}; plans: {', '.join(policy.plans)}")
    _windows(override.quotas)
    budget = override.budget_usd_per_day
    if budget is not None:
        if not (math.isfinite(budget) and budget > 0):
            raise ValueError(f"--budget-usd-per-day must be a positive number, got {budget:g}")
        free = unpriced(policy.models)
        if free:
            raise ValueError(f"model {free[0]!r} has no prices in {policy.source}: a "
                             "dollar budget would let it spend for free")


def _windows(texts: tuple[str, ...]) -> tuple[Window, ...]:
    windows = []
    for text in texts:
        try:
            windows.append(parse_window(text))
        except ValueError as exc:
            raise ValueError(f"bad quota {text!r}: {exc}") from None
    lengths = [(w.seconds, w.calendar) for w in windows]
    if len(set(lengths)) != len(lengths):
        raise ValueError("two quotas share one window length; keep the one you mean")
    return tuple(windows)


def derive(plan: Plan, override: Override, plans: Mapping[str, Plan], who: str) -> Plan:
    """``plan`` (or the override's own plan) with the override's quotas and budget.

    A quota replaces the plan's quota of the same window length and keeps its place (and
    key: the usage carries over); a quota of a new length is added; the others stay.
    """
    base = plans.get(override.plan, plan) if override.plan else plan
    quotas = list(base.quotas)
    for window in _windows(override.quotas):
        same = [i for i, q in enumerate(quotas)
                if (q.seconds, q.calendar) == (window.seconds, window.calendar)]
        if same:
            quotas[same[0]] = window
        else:
            quotas.append(window)
    budget = override.budget_usd_per_day
    return replace(base, name=f"{base.name}{OVERRIDDEN}{who}", quotas=tuple(quotas),
                   budget_usd_per_day=base.budget_usd_per_day if budget is None else budget)
