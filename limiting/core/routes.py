"""Limits on a route (decorators and ``[routes."blueprint.endpoint"]``), as plain specs.

A route limit is its own (keyed by endpoint and key value) unless it names a ``scope``, which
every route naming it shares. Specs hold numbers only; limiting/web/routes.py turns them into
layers and keys inside the request. Importing neither layers nor Flask keeps the policy file's
reader (policy.py) able to use this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .policy_reader import MODES, FailMode, Mode, PolicyError, TableReader
from .windows import Window, parse_window

# What a TOML route's key may name; decorators may also pass a callable.
KEY_NAMES = ("user", "ip", "key", "org")
HEADER_KEY = "header:"

# A key or cost read inside the request: a value, or a callable evaluated per request.
KeySource = str | Callable[[], str]
CostSource = int | Callable[[], int]


def check_key(key: object) -> None:
    """Refuse a key that is neither a callable nor one of the names (ValueError: the reason)."""
    if callable(key):
        return
    if not isinstance(key, str) or not (key in KEY_NAMES or (
            key.startswith(HEADER_KEY) and len(key) > len(HEADER_KEY))):
        raise ValueError(f"must be one of {', '.join(KEY_NAMES)} or 'header:<Name>', "
                         f"got {key!r}")


def check_cost(cost: object) -> None:
    if callable(cost):
        return
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
        raise ValueError(f"must be a whole number >= 0 or a callable, got {cost!r}")


@dataclass(frozen=True, slots=True)
class RouteLimit:
    """One limit on a route: a token bucket (``burst``, ``per_second``) or a strict window.

    ``deduct_when(response) -> bool``: False gives this limit's charge back after the view
    (charged first, so concurrent requests can never pass more than the limit)."""

    burst: float = 0
    per_second: float = 0
    window: Window | None = None
    key: KeySource = "ip"
    cost: CostSource = 1
    scope: str | None = None
    mode: Mode = "enforce"
    fail: FailMode = "fail_open"
    deduct_when: Callable[[Any], bool] | None = None


def token_bucket(burst: float, per_second: float, key: KeySource = "ip", cost: CostSource = 1,
                 scope: str | None = None, *, mode: Mode = "enforce",
                 fail: FailMode = "fail_open",
                 deduct_when: Callable[[Any], bool] | None = None) -> RouteLimit:
    """A token bucket of ``burst`` units refilled ``per_second``; checked on the spot."""
    if not (burst > 0 and per_second > 0):
        raise ValueError(f"token_bucket needs burst > 0 and per_second > 0, got "
                         f"{burst!r}, {per_second!r}")
    _check(key, cost, scope, mode)
    return RouteLimit(float(burst), float(per_second), None, key, cost, scope, mode, fail,
                      deduct_when)


def sliding_window(text: str, key: KeySource = "ip", cost: CostSource = 1,
                   scope: str | None = None, *, mode: Mode = "enforce",
                   fail: FailMode = "fail_closed",
                   deduct_when: Callable[[Any], bool] | None = None) -> RouteLimit:
    """A strict sliding window ("100 per day"; "N per month": the calendar month, UTC)."""
    _check(key, cost, scope, mode)
    return RouteLimit(window=parse_window(text), key=key, cost=cost, scope=scope, mode=mode,
                      fail=fail, deduct_when=deduct_when)


def _check(key: object, cost: object, scope: object, mode: object) -> None:
    check_key(key)
    check_cost(cost)
    if scope is not None and (not isinstance(scope, str) or not scope):
        raise ValueError(f"scope must be a non-empty string, got {scope!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be 'enforce' or 'shadow', got {mode!r}")


def parse_routes(source: str, table: Mapping[str, Any]) -> dict[str, tuple[RouteLimit, ...]]:
    """``[routes."blueprint.endpoint"]`` tables → endpoint → its limits, every key checked.

    Keys: ``token_bucket = { burst, per_second }``, ``quotas = ["100 per day"]``, ``cost``,
    ``scope``, ``key`` ("user", "ip", "key", "org", "header:X-Team"), ``mode``, ``fail``.
    Whether the endpoint exists is checked by the app once its blueprints are registered."""
    out: dict[str, tuple[RouteLimit, ...]] = {}
    for endpoint, body in table.items():
        r = TableReader(source, f'routes."{endpoint}"', body)
        key = r.get("key", str, "ip")
        cost = r.get("cost", int, 1)
        scope = r.get("scope", str)
        for name, value, check in (("key", key, check_key), ("cost", cost, check_cost)):
            try:
                check(value)
            except ValueError as exc:
                r.fail(name, str(exc))
        mode = r.mode()
        if scope is not None and not scope:
            r.fail("scope", "must be a non-empty name")
        limits: list[RouteLimit] = []
        bucket = r.get("token_bucket", dict)
        if bucket is not None:
            b = TableReader(source, f'routes."{endpoint}".token_bucket', bucket)
            limits.append(RouteLimit(float(b.positive("burst", (int, float), required=True)),
                                     float(b.positive("per_second", (int, float),
                                                      required=True)),
                                     None, key, cost, scope, mode,
                                     r.fail_mode("fail_rate", "fail_open")))
            b.done()
        fail_quota = r.fail_mode("fail_quota", "fail_closed")
        # Two of one length are two limits here: each is bound to a key of its own.
        for window in r.windows("quotas", distinct=False):
            limits.append(RouteLimit(window=window, key=key, cost=cost, scope=scope, mode=mode,
                                     fail=fail_quota))
        if not limits:
            r.fail("", "needs token_bucket or quotas")
        r.done()
        out[endpoint] = tuple(limits)
    return out


def unknown_endpoints(source: str, routes: Mapping[str, object], known: set[str]) -> None:
    """Raise PolicyError naming the first ``[routes]`` endpoint the app does not have."""
    for endpoint in routes:
        if endpoint not in known:
            hint = ", ".join(sorted(known)[:8])
            raise PolicyError(f'{source}: routes."{endpoint}": no such endpoint in the app '
                              f"(endpoints are 'blueprint.function', e.g. {hint})")
