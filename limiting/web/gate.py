"""One gate for every request: resolve → deny cache → execute → record → headers → wait → refuse.

Every way a request is charged passes through :meth:`Gate.admit`: ``acquire`` (and the
``plan(user=...)`` decorator, which calls it), ``reserve``, and the route hook for views that
charge nobody. Only what is executed differs (one call for the user's layers, a reservation,
or the route's limits with the edge); the steps around it are written once here. The door
(door.py), which answers before Flask, asks the same deny cache through :meth:`Gate.held_at`.

Who pays is resolved once per request (:func:`payer`): the view that needs the plan before
charging (/chat's max tokens, /v1's default) and the charge itself share the one
:class:`Payer`, kept in the request's RequestLimits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from flask import Response, after_this_request, current_app, request

from .. import metrics
from ..composed import Charged
from ..core.decision import Decision, GuardRefused, Refused
from ..core.groups import Group
from ..core.headers import rate_limit_headers
from ..core.naming import BODY_USER, KEY_USER
from ..core.policy import Plan, Policy
from ..deny import DenyCache
from ..engine import Engine
from ..reservation import Reservation
from ..tracing import annotate, span, tracing
from .context import LIMITED_ROUTE, RequestLimits, request_limits
from .door import early_of, learn_alias
from .edge import AfterHook
from .errors import (
    ExceedsLimit,
    LimiterUnavailable,
    RateLimited,
    UpstreamSaturated,
    json_response,
    refusal_error,
)
from .flask_limiter_adapter import RequestHooks
from .identity import client_ip
from .recording import count_refusal, record, record_guard
from .routes import RouteLimits, RouteState, keep, pending
from .waiting import ClientGone, max_wait, wait_for_slot


@dataclass(frozen=True, slots=True)
class Payer:
    """Who a request charges, resolved once: the user, their realm (KEY_USER: authenticated;
    BODY_USER: a body's claim), the plan and org they are charged on, and what the caller
    named (an API key's plan and org), which the deny cache's aliases remember. ``tags``:
    the API key's (from its record only; an anonymous caller has none)."""

    user: str
    realm: str
    plan: Plan
    org: Plan | None
    key_plan: str | None = None
    key_org: str | None = None
    tags: tuple[str, ...] = ()

    def same(self, user: str, key_plan: str | None, realm: str, key_org: str | None,
             tags: tuple[str, ...] = ()) -> bool:
        return (self.user == user and self.key_plan == key_plan and self.realm == realm
                and self.key_org == key_org and self.tags == tags)


def payer(policy: Policy, user: str, key_plan: str | None = None, *, anonymous: bool = False,
          key_org: str | None = None, tags: Sequence[str] = ()) -> Payer:
    """The request's payer: resolved on first use, then the same object for the rest of the
    request (a view that read the plan, and then the acquire or reserve that charges it).
    ``tags``: an API key's record's; never a request's, and none for an anonymous caller."""
    limits = request_limits()
    realm = BODY_USER if anonymous else KEY_USER
    borne = () if anonymous else tuple(tags)
    found: Payer | None = limits.payer
    if found is not None and found.same(user, key_plan, realm, key_org, borne):
        return found
    made = limits.payer = Payer(user, realm, policy.resolve(user, key_plan, realm),
                                policy.org_of(user, key_org), key_plan, key_org, borne)
    return made


@dataclass(slots=True)
class Passage:
    """What an executed step charged: its decision, the route limits' charges (for their
    ``deduct_when``), and how to give everything back (the client left while waiting)."""

    decision: Decision
    charged: list[Charged] = field(default_factory=list)
    give_back: Callable[[], None] = lambda: None
    reservation: Reservation | None = None   # what reserve() hands the view


# (the route limits to carry, seconds the request may wait) -> the passage; raises Refused
# or GuardRefused when the store refused.
Execute = Callable[[list[Group], float], Passage]


class Host(Protocol):
    """What the gate uses of a RateLimiter (the extension imports this module)."""

    @property
    def engine(self) -> Engine: ...

    deny: DenyCache | None
    routes: RouteLimits


class Gate:
    """The request lifecycle, once, for a RateLimiter (``host``)."""

    def __init__(self, host: Host) -> None:
        self.host = host
        # Flask-Limiter's hooks, taken out of the app (edge.py): its check runs in
        # before(), its after-request hook in after_hook(), on the routes that need them.
        self.edge_hooks: RequestHooks | None = None

    def admit(self, who: Payer | None, execute: Execute) -> Passage:
        """Charge the current request (``who``: its payer; None: a route that charges
        nobody, counted by its address) or raise the refusal its view would render."""
        started = time.perf_counter()
        limits = request_limits()
        if who is not None:
            self._refuse_if_held(who, limits, started)
        state, extra = self._route_groups(who, limits)
        wait = max_wait(who.plan) if who is not None else 0.0
        subject = who.user if who is not None else "ip:" + client_ip()
        plan = who.plan.name if who is not None else ""   # metrics count by the resolved plan
        with span("limiter.decide", {"limiter.plan": plan}) as traced:
            try:
                passage = execute(extra, wait)
            except GuardRefused as guard:
                limits.decision = guard.decision
                limits.deciding_ms = (time.perf_counter() - started) * 1000
                annotate(traced, {"limiter.refused_by": f"upstream:{guard.model}"})
                record_guard(guard, subject, started, plan)
                raise refusal_error(guard) from None
            except Refused as refused:
                passage = Passage(refused.decision)
            decision = passage.decision
            limits.decision = decision
            limits.deciding_ms = (time.perf_counter() - started) * 1000
            annotate(traced, traced_decision(decision))
        record(decision, subject, started, plan)
        if not decision.allowed:
            if who is not None:
                self._remember(decision, who, started)
            raise refusal_error(Refused(decision))
        if not wait_for_slot(decision, subject):
            passage.give_back()   # hung up while waiting: the slot goes back
            raise ClientGone()
        keep(state, passage.charged)
        return passage

    def _route_groups(self, who: Payer | None, limits: RequestLimits
                      ) -> tuple[RouteState | None, list[Group]]:
        """The route's limits this call carries: the view's payer's, or (no payer) the
        route hook's own, counted by the address, with the edge on one server."""
        routes = self.host.routes
        if who is not None:
            org = who.org.name if who.org is not None else None
            return pending(routes, who.user, org, who.realm)
        state: RouteState = limits.routes
        state.used = True
        groups = routes.groups(state.bounds, None)
        edge = self.host.engine.edge_group(client_ip())
        return state, [edge, *groups] if edge is not None else groups

    # --- the deny cache ---------------------------------------------------------------------

    def _refuse_if_held(self, who: Payer, limits: RequestLimits, started: float) -> None:
        """Raise the refusal now, with no store call, when this worker's deny cache knows the
        store would refuse: the same 429 (body, Retry-After, RateLimit headers) as the
        store's. A request that may wait for its slot (the plan's max_wait_seconds) is the
        store's to place: an entry answers only when its wait is longer than that."""
        deny = self.host.deny
        if not deny:   # off, or nothing remembered: the common case costs this test
            return
        plan = who.plan
        decision = deny.refusal(client_ip(), who.user, who.realm, plan, plan.max_wait_seconds)
        if decision is None:
            return
        metrics.count(metrics.DENY_CACHE_HITS)
        limits.decision = decision
        record(decision, who.user, started, plan.name)
        raise refusal_error(Refused(decision))

    def held_at(self, ip: str, patience: float, named: Callable[[], tuple[str, str, str | None]
                                                                    | None],
                policy: Policy) -> Decision | None:
        """The door's question, with no request context: the cached refusal of ``ip`` at
        the edge (past ``patience``), else of the caller ``named()`` finds, counted and
        logged; None: Flask decides. An entry due to be asked again is left to Flask's path
        (probe=False), where one request asks the store."""
        deny = self.host.deny
        if not deny:
            return None
        started = time.perf_counter()
        decision = deny.edge(ip, patience, probe=False)
        user, plan_name = ip, ""   # the edge refuses before any plan
        if decision is None:
            found = named()
            if found is None:
                return None
            realm, user, key_plan = found
            plan = policy.resolve(user, key_plan, realm)   # the door's one resolution
            decision = deny.caller(user, realm, plan, plan.max_wait_seconds, probe=False)
            if decision is None:
                return None
            plan_name = plan.name
        metrics.count(metrics.DENY_CACHE_HITS)
        metrics.time_decision(started)
        count_refusal(decision, user, ip, plan_name)
        if tracing():   # the store's refusal, remembered: a decision all the same
            with span("limiter.decide", {"limiter.plan": plan_name,
                                         "limiter.deny_cache": True}) as traced:
                annotate(traced, traced_decision(decision))
        return decision

    def _remember(self, decision: Decision, who: Payer, started: float) -> None:
        """Tell the deny cache the store's refusal of a call sent at ``started``; on a view
        that lets the door refuse early, also what in the request named the payer."""
        deny = self.host.deny
        if deny is None:
            return
        compiled = self.host.engine.compiled(who.plan)
        kept = deny.learn(decision, started, client_ip(), who.user, who.realm, who.plan,
                          compiled.layers, compiled.edge_count)
        if kept == "caller":
            early = early_of(current_app.view_functions.get(request.endpoint or ""))
            if early is not None:
                learn_alias(deny, early, request.headers, who.realm, who.user, who.key_plan)

    # --- the route hook ---------------------------------------------------------------------

    def before(self) -> None:
        """The one before_request hook: the route's limits (:meth:`_route_limits`), then
        Flask-Limiter's edge check on a route whose own call does not carry the edge and that
        is not exempt from it."""
        self._route_limits()
        hooks = self.edge_hooks
        if hooks is not None and not request_limits().edge_hooks_idle():
            hooks.check()

    def _route_limits(self) -> None:
        """Find the route's limits; on a view that charges a user, leave them to its
        acquire/reserve; otherwise decide them now, with the edge."""
        endpoint = request.endpoint
        if endpoint is None:
            return
        engine = self.host.engine
        routes = self.host.routes
        bounds = routes.cached(engine.policy, endpoint)   # every request: no app lookups
        if bounds is None:
            routes.warn_unknown(current_app, engine.policy)
            bounds = routes.of(current_app, engine.policy, endpoint)
        if not bounds:
            return
        limits = request_limits()
        limits.routes = RouteState(bounds)
        if any(b.limit.deduct_when is not None for b in bounds):
            after_this_request(self._deduct)   # only these requests pay for an after hook
        if getattr(current_app.view_functions.get(endpoint), LIMITED_ROUTE, False):
            return   # the view's acquire/reserve checks them in its call
        limits.limited_route = True   # this call carries the edge (one server)

        def decide(groups: list[Group], wait: float) -> Passage:
            outcome = engine.decide(groups)
            return Passage(outcome.decision, outcome.charged)

        self.admit(None, decide)

    def _deduct(self, response: Response) -> Response:
        """After a view whose limits have a ``deduct_when``: give back what it refuses."""
        state = request_limits().routes
        if state is not None and state.charged:
            back = [charged for charged, when in state.charged if not when(response)]
            if back:
                self.host.engine.refund(back)
        return response

    # --- the headers ------------------------------------------------------------------------

    def after_hook(self) -> AfterHook:
        """The extension's one after_request hook (each hook Flask runs costs on every
        request): our headers, then Flask-Limiter's own hook on the routes it checked."""
        def after_request(response: Response) -> Response:
            limits = request_limits()
            response = self._add_headers(response, limits)
            hooks = self.edge_hooks
            if hooks is None or limits.edge_hooks_idle():
                return response
            return hooks.after(response)  # type: ignore[no-any-return]

        return after_request

    def _add_headers(self, response: Response, limits: RequestLimits) -> Response:
        decision = limits.decision
        if decision is None and limits.is_limited_route():
            # Turned away before acquire (bad input): the edge still counts the attempt.
            decision = self.host.engine.charge_edge(client_ip())
            if decision is not None and not decision.allowed:
                return render_refusal(RateLimited.from_decision(decision,
                                                                rate_limit_headers(decision)))
        if decision is not None and response.status_code != 429 \
                and "RateLimit" not in response.headers:
            # A view that set them (the /v1 dialects do) keeps its own; otherwise they are
            # new, and join the header list as it is sent (SendLimitHeaders).
            limits.headers = list(rate_limit_headers(decision).items())
        rid = limits.request_id
        if rid is not None:
            response.headers["X-Request-ID"] = rid
        return response


def traced_decision(decision: Decision) -> dict[str, str | float | bool]:
    """A decision as span attributes: the layers met, the refusing one, the wait."""
    out: dict[str, str | float | bool] = {
        "limiter.allowed": decision.allowed,
        "limiter.layers": ",".join(s.layer.name for s in decision.states)}
    if decision.refused is not None:
        out["limiter.refused_by"] = decision.refused.layer.name
    if decision.delay or not decision.allowed:
        out["limiter.wait_seconds"] = decision.delay or (decision.wait or 0.0)
    return out


def render_refusal(exc: RateLimited | LimiterUnavailable | UpstreamSaturated | ExceedsLimit
                   ) -> Response:
    """The app's error handler for the limiter's refusals."""
    if isinstance(exc, (RateLimited, ExceedsLimit)) and exc.limit_headers:
        # Our own header values: they join the WSGI list as sent (SendLimitHeaders), as an
        # admitted response's do; a refusal under abuse is the hot path.
        request_limits().headers = [(name, value) for name, value in exc.limit_headers.items()
                                    if name != "Retry-After"]
    return json_response(exc.code or 429, exc.body(), None, exc.retry_after)
