"""Limits where the routes are: ``@token_bucket`` / ``@sliding_window`` on a view or Blueprint,
``[routes."blueprint.endpoint"]`` in the policy, ``exempt``, ``deduct_when``.

The decorators only mark their target; nothing is charged by them. The gate's hook before the
view (limiting/web/gate.py) finds the route's limits (its own, its blueprints', the policy's)
and:

- on a view that charges a user (``plan(...)``: its own, /chat, /v1), leaves them for that view's
  acquire/reserve, whose one call checks them with the edge and the plan;
- on any other view, decides them with the edge in one call, before the view.

Either way every limit a request meets is decided in one all-or-nothing call (one per hash
slot on a Cluster, compensated). A limit with ``deduct_when`` is charged with the others and
given back after the view when ``deduct_when(response)`` is false: charged first, so even
concurrent requests over many workers never pass more than the limit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from flask import Flask, current_app, request

from ..composed import Charged
from ..core.codec import Kind
from ..core.groups import Group
from ..core.layers import Layer, bucket, month, window
from ..core.naming import BODY_USER, KEY_USER, digest, user_tag
from ..core.policy import Policy
from ..core.routes import HEADER_KEY, RouteLimit, unknown_endpoints
from ..core.routes import sliding_window as sliding_window_limit
from ..core.routes import token_bucket as token_bucket_limit
from ..keys import presented_key
from ..stores.store import StoreUnavailable
from .context import request_limits
from .door import early_of
from .identity import client_ip

log = logging.getLogger("limiter.routes")
T = TypeVar("T")

# Attributes on a view function or Blueprint object.
ROUTE_LIMITS = "_llm_route_limits"
ROUTE_EXEMPT = "_llm_route_exempt"


def _attach(limit: RouteLimit) -> Callable[[T], T]:
    def mark(target: T) -> T:
        own = getattr(target, ROUTE_LIMITS, ())
        # Decorators apply bottom up: the one written on top is listed first.
        setattr(target, ROUTE_LIMITS, (limit, *own))
        return target
    return mark


def token_bucket(burst: float, per_second: float, key: Any = "ip", cost: Any = 1,
                 scope: str | None = None, **options: Any) -> Callable[[T], T]:
    """``@token_bucket(5, 0.1, key=...)`` on a view or ``token_bucket(...)(blueprint)``: a
    bucket of ``burst`` units refilled ``per_second``. ``key``: a callable, or "ip" (the
    default), "user", "key", "org", "header:<Name>"; ``cost``: units a call, or a callable
    (0: only looks); ``scope``: share it with every route naming the same scope. Options:
    ``mode="shadow"``, ``deduct_when=lambda response: ...``, ``fail="fail_closed"``."""
    return _attach(token_bucket_limit(burst, per_second, key, cost, scope, **options))


def sliding_window(text: str, key: Any = "ip", cost: Any = 1, scope: str | None = None,
                   **options: Any) -> Callable[[T], T]:
    """``@sliding_window("100 per day", ...)``: a strict sliding window (``"N per month"``:
    the calendar month, UTC); arguments as :func:`token_bucket`'s."""
    return _attach(sliding_window_limit(text, key, cost, scope, **options))


def exempt(target: Any) -> Any:
    """Keep a view or Blueprint out of every route limit (decorators and [routes])."""
    setattr(target, ROUTE_EXEMPT, True)
    return target


@dataclass(frozen=True, slots=True)
class Bound:
    """A route limit as one endpoint meets it: its layer, hash tag head and key suffix."""

    limit: RouteLimit
    layer: Layer
    head: str        # "r:<endpoint>" (the route's own) or "s:<scope>" (shared)
    suffix: str
    shared: Layer    # ``layer`` as a counter others reach too (Layer.shared)


@dataclass(slots=True)
class RouteState:
    """A request's route limits: waiting for the view's acquire, then what they charged."""

    bounds: tuple[Bound, ...]
    used: bool = False
    charged: list[tuple[Charged, Callable[[Any], bool]]] = field(default_factory=list)


def bind(endpoint: str, limits: Sequence[RouteLimit]) -> tuple[Bound, ...]:
    """``limits`` as ``endpoint`` meets them: named for headers and 429s (the scope, else
    "route:<endpoint>"; a window adds its unit), keyed apart when two would collide."""
    out: list[Bound] = []
    seen: set[tuple[str, str]] = set()
    for limit in limits:
        base = limit.scope or f"route:{endpoint}"
        head = f"s:{user_tag(limit.scope)}" if limit.scope else f"r:{user_tag(endpoint)}"
        if limit.window is None:
            name, suffix = base, "b"
            layer = bucket(name, suffix, limit.burst, limit.per_second, limit.fail)
        else:
            w = limit.window
            name = f"{base}:{w.name.removeprefix('quota-')}"
            suffix = "m" if w.calendar else f"w{w.seconds}"
            layer = (month(name, suffix, w.amount, limit.fail) if w.calendar
                     else window(name, suffix, w.amount, w.seconds, limit.fail))
        n = 1
        while (head, suffix) in seen:   # two alike on one route: each its own counter
            n += 1
            suffix = f"{layer.suffix}.{n}"
            name = f"{layer.name}#{n}"
        seen.add((head, suffix))
        layer = replace(layer, name=name, suffix=suffix, shadow=limit.mode == "shadow")
        shared = replace(layer, shared=True) if layer.kind is Kind.BUCKET else layer
        out.append(Bound(limit, layer, head, suffix, shared))
    return tuple(out)


class RouteLimits:
    """Every endpoint's route limits for one app, found once per endpoint and policy."""

    def __init__(self, namespace: str = "rl:",
                 authenticate: Callable[[str], bool] | None = None) -> None:
        self.namespace = namespace
        # Is this presented key a live API key? For "key" limits on routes that charge nobody.
        self.authenticate = authenticate
        self._cache: dict[str, tuple[Bound, ...]] = {}
        self._policy: Policy | None = None
        self._checked = False

    def cached(self, policy: Policy, endpoint: str) -> tuple[Bound, ...] | None:
        """The endpoint's limits when already found for this policy, else None."""
        return self._cache.get(endpoint) if policy is self._policy else None

    def of(self, app: Flask, policy: Policy, endpoint: str) -> tuple[Bound, ...]:
        if policy is not self._policy:   # a reloaded policy: its [routes] may have changed
            self._cache.clear()
            self._policy, self._checked = policy, False
        found = self._cache.get(endpoint)
        if found is None:
            found = self._cache[endpoint] = bind(endpoint, self._find(app, policy, endpoint))
        return found

    def _find(self, app: Flask, policy: Policy, endpoint: str) -> list[RouteLimit]:
        view = app.view_functions.get(endpoint)
        parts = endpoint.split(".")[:-1]
        blueprints = [app.blueprints.get(".".join(parts[:i])) for i in range(len(parts), 0, -1)]
        targets = [view, *blueprints]
        if any(getattr(t, ROUTE_EXEMPT, False) for t in targets if t is not None):
            return []
        limits = [limit for t in targets if t is not None for limit in getattr(t, ROUTE_LIMITS, ())]
        return limits + list(policy.routes.get(endpoint, ()))

    def warn_unknown(self, app: Flask, policy: Policy) -> None:
        """[routes] naming an endpoint the app lacks: logged once per policy (the app's
        blueprints are only all known now); ``limits check-config`` refuses it outright."""
        if self._checked or not policy.routes:
            return
        self._checked = True
        try:
            unknown_endpoints(policy.source, policy.routes, set(app.view_functions))
        except ValueError as exc:
            log.warning("%s; that route limit applies to nothing", exc)

    def groups(self, bounds: Sequence[Bound], user: str | None,
               org: str | None = None, realm: str = KEY_USER) -> list[Group]:
        """One Group per limit, keyed and costed inside this request (``user`` and ``org``:
        whom the view charges, if anyone; ``realm``: whether the view authenticated them)."""
        out = []
        for b in bounds:
            limit = b.limit
            cost = limit.cost
            if callable(cost):   # a fixed cost was checked when the limit was made
                cost = cost()
                if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
                    raise TypeError(f"{b.layer.name}: cost must be a whole number >= 0, "
                                    f"got {cost!r}")
            value = key_value(limit.key, user, org, realm, self.authenticate)
            tag = f"{self.namespace}{{{b.head}:{user_tag(value)}}}"
            layer = b.layer if own_counter(limit, value) else b.shared
            out.append(Group.of([layer], [f"{tag}:{b.suffix}"], [cost], tag))
        return out


def own_counter(limit: RouteLimit, value: str) -> bool:
    """Does only the caller reach this counter? Its route's own (no scope), counted by the
    user it charges (a /chat body's user_id as its plan bucket is) or the key that
    authenticated. Anything else (a scope, an IP, a header, an org, a callable's value)
    others reach too: a waiter may not put such a bucket in debt."""
    return (limit.scope is None and not callable(limit.key) and limit.key in ("user", "key", "org")
            and value.startswith(("u:", "b:", "k:")))


def key_value(key: Any, user: str | None, org: str | None = None,
              realm: str = KEY_USER, authenticate: Callable[[str], bool] | None = None) -> str:
    """The value a route limit is counted by in this request.

    A /chat body's user_id is a claim anyone can make: it counts apart from the key holder
    of that name (``b:``/``ob:`` beside ``u:``/``o:``), as its plan and org layers do, so an
    anonymous caller can never spend a key holder's route limits."""
    if callable(key):
        return str(key())
    if key == "ip":
        return "ip:" + client_ip()
    claimed = realm == BODY_USER
    if key == "org" and org is not None:
        return ("ob:" if claimed else "o:") + org
    if key in ("user", "org"):
        # The user this request charges (a user in no org is an org of one); a route that
        # charges nobody counts by the client's address.
        if user is None:
            return "ip:" + client_ip()
        return ("b:" if claimed else "u:") + user
    if key == "key":
        token = _counted_key(user, realm, authenticate)
        if token:
            return "k:" + digest(token, 32)
        return "ip:" + client_ip()
    header = request.headers.get(key[len(HEADER_KEY):])
    return "h:" + header if header else "ip:" + client_ip()


def _counted_key(user: str | None, realm: str,
                 authenticate: Callable[[str], bool] | None) -> str | None:
    """The API key a ``key = "key"`` limit counts: only one that authenticated, else None
    (the client's address is counted), so a made-up key per request is not a counter per
    request. On a view that charges a user: the key it authenticated, read where the view
    reads it (its ``Early.key``: /v1/messages takes x-api-key before Bearer), and none for a
    caller it named by the body. On any other route: the presented key if it is a live one
    (``authenticate``; a store away counts the address)."""
    if user is None:
        token = presented_key(request.headers)
        if not token or authenticate is None:
            return token
        try:
            return token if authenticate(token) else None
        except StoreUnavailable:
            return None
    if realm == BODY_USER:
        return None
    early = early_of(current_app.view_functions.get(request.endpoint or ""))
    return (early.key if early is not None else presented_key)(request.headers)


def pending(routes: RouteLimits, user: str, org: str | None = None, realm: str = KEY_USER
            ) -> tuple[RouteState | None, list[Group]]:
    """The route limits the view's acquire/reserve should carry (once per request); ``org``:
    the org the request is charged to, for limits keyed by "org"; ``realm``: KEY_USER for an
    authenticated user, BODY_USER for a /chat body's claim."""
    state: RouteState | None = request_limits().routes
    if state is None or state.used:
        return None, []
    state.used = True
    return state, routes.groups(state.bounds, user, org, realm)


def keep(state: RouteState | None, charged: Sequence[Charged]) -> None:
    """Remember what was charged to limits with a ``deduct_when``, for after the view."""
    if state is None:
        return
    for item in charged:
        for b in state.bounds:
            first = item[0].layers[0]
            if (first is b.layer or first is b.shared) and b.limit.deduct_when is not None:
                state.charged.append((item, b.limit.deduct_when))
