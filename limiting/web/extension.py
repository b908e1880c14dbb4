"""The Flask extension: ``RateLimiter().init_app(app)``, then ``plan``/``acquire`` on any route."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

from flask import Blueprint, Flask, Response, current_app
from flask_limiter import Limiter
from werkzeug.middleware.proxy_fix import ProxyFix

from .. import metrics
from ..audit import record_reloads
from ..composed import Charged
from ..core.ask import Ask
from ..core.decision import Decision, GuardRefused, Refused
from ..core.headers import rate_limit_headers
from ..core.layers import Layer
from ..core.naming import BODY_USER, KEY_USER, EdgeKeys
from ..core.policy import Plan, Policy
from ..core.pricing import STANDARD, PriceTerms
from ..core.shares import per_worker
from ..core.upstream import Observer
from ..deny import DenyCache
from ..engine import Engine
from ..keys import ApiKeys
from ..ledger import Ledger
from ..overrides import attach, on_change
from ..reloading import KEPT
from ..reservation import Reservation
from ..stores.store import Store
from .auth_failures import AuthFailures
from .cli import limits_cli
from .configured import app_policy, app_store
from .context import RequestLimits, SendLimitHeaders, request_limits
from .denying import refuse_if_denied, remember_refusal
from .door import Door
from .edge import AfterHook, combines_edge, init_edge
from .errors import (
    ExceedsLimit,
    LimiterUnavailable,
    RateLimited,
    UpstreamSaturated,
    json_response,
    refusal_error,
)
from .identity import client_ip
from .keys_cli import keys_cli
from .operated import EXTENSION_KEY
from .payer import KeyReader, Render, UserFrom, declare
from .recording import record, record_guard
from .routes import RouteLimits, install, keep, pending
from .routes import exempt as exempt_routes
from .routes import sliding_window as route_window
from .routes import token_bucket as route_bucket
from .spend_cli import audit_command, spend_cli
from .waiting import ClientGone, max_wait, wait_for_slot

F = TypeVar("F", bound=Callable[..., Any])
E = TypeVar("E", bound=Callable[..., Any] | Blueprint)


class RateLimiter:
    """Layered limits for a Flask app: edge per IP, then one atomic call for a user's layers.

    Works with no configuration (limiting/web/configured.py: the policy's and the store's
    order). Configuration (app.config, falling back to the environment): ``LIMITS`` (the
    policy as a dict), ``LIMITS_CONFIG`` (a policy file), ``REDIS_URL``, ``TRUSTED_PROXIES``
    (X-Forwarded-For hops to believe, default 0).
    """

    def __init__(self, app: Flask | None = None, *, policy: Policy | None = None,
                 store: Store | None = None) -> None:
        self._policy = policy
        self._store = store
        self._engine: Engine | None = None
        self._keys: ApiKeys | None = None
        self._observer: Observer | None = None
        self._auth_failures: AuthFailures | None = None
        # This worker's remembered refusals (limiting/deny.py); None: DENY_CACHE=0.
        self.deny: DenyCache | None = None
        self.edge: Limiter | None = None
        self.routes = RouteLimits(authenticate=lambda key: self.keys.authenticate(key) is not None)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        policy = app_policy(app, self._policy)
        store = self._store or app_store(app, timeout=policy.timeout_ms / 1000)
        policy = attach(policy, store)   # `flask limits set`: seen here within a second
        _audit_reloads(policy, store)
        metrics.budgets(policy.plans)
        edge_layers: tuple[Layer, ...] = ()
        edge_keys = None
        if policy.edge_per_ip and combines_edge(store):
            edge_keys = EdgeKeys(policy.edge_per_ip)
            edge_layers = edge_keys.layers(policy.fail_edge)
        self._engine = Engine(store, policy, edge=edge_layers, edge_keys=edge_keys)
        if policy.local_fallback:
            from ..stores.memory import MemoryStore

            # gunicorn.conf.py reads the same variable, with the same default.
            workers = int(_setting(app, "WEB_CONCURRENCY", "4") or 4)
            self._engine.fallback = Engine(MemoryStore(), per_worker(policy, workers))
        if _setting(app, "DENY_CACHE", "1").lower() not in ("0", "false", "no", "off"):
            self.deny = DenyCache()
            on_change(policy, self.deny.clear)   # limits set/unset/reset: ask the store again
            # Inside ProxyFix (added next): the door sees the address the edge counts.
            app.wsgi_app = Door(app.wsgi_app, app, self.deny, policy)  # type: ignore[method-assign]
        hops = int(_setting(app, "TRUSTED_PROXIES", "0") or 0)
        if hops > 0:
            # Only the last `hops` X-Forwarded-For entries were written by proxies we run;
            # anything before them is the client's claim and must not pick the edge key.
            app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops)  # type: ignore[method-assign]
        # Before the edge's hooks: a route whose call carries the edge is marked first.
        install(app, self.routes, lambda: self.engine, record)
        self.edge, edge_after = init_edge(app, policy, store)
        app.extensions[EXTENSION_KEY] = self
        app.after_request(_after_request(edge_after))
        app.wsgi_app = SendLimitHeaders(app.wsgi_app)  # type: ignore[method-assign]
        app.register_error_handler(RateLimited, _render_refusal)
        app.register_error_handler(LimiterUnavailable, _render_refusal)
        app.register_error_handler(UpstreamSaturated, _render_refusal)
        app.register_error_handler(ExceedsLimit, _render_refusal)
        app.cli.add_command(limits_cli)
        app.cli.add_command(keys_cli)
        app.cli.add_command(spend_cli)
        app.cli.add_command(audit_command)

    @property
    def engine(self) -> Engine:
        assert self._engine is not None, "RateLimiter.init_app(app) was not called"
        return self._engine

    @property
    def policy(self) -> Policy:
        return self.engine.policy

    @property
    def store(self) -> Store:
        return self.engine.store

    @property
    def keys(self) -> ApiKeys:
        """API keys on the same store (created by ``flask keys create``)."""
        if self._keys is None:
            policy = self.policy
            self._keys = ApiKeys(self.store, policy.default_plan, policy.plans,
                                 orgs=policy.orgs)
        return self._keys

    @property
    def ledger(self) -> Ledger:
        """Who spent what, per day (limiting/ledger.py), on the same store."""
        return Ledger(self.store, self.engine.namespace)

    @property
    def auth_failures(self) -> AuthFailures:
        """Failed operator credentials per client IP (admin pages, /metrics)."""
        if self._auth_failures is None:
            self._auth_failures = AuthFailures(self.store)
        return self._auth_failures

    def acquire(self, user: str, plan: str | None = None, *, anonymous: bool = False,
                org: str | None = None) -> Decision:
        """Charge one request to ``user`` (and their org) or raise RateLimited /
        LimiterUnavailable. ``plan``, ``org``: an API key's (else the user's own).

        ``anonymous``: ``user`` is the client's own claim (a body field), not an authenticated
        user; such ids have limits of their own and never spend an authenticated user's.
        The decision is kept in request_limits() so the response carries its headers.
        """
        started = time.perf_counter()
        engine = self.engine
        policy = engine.policy
        realm = BODY_USER if anonymous else KEY_USER
        resolved, org_plan = policy.resolve(user, plan, realm), policy.org_of(user, org)
        refuse_if_denied(self.deny, user, realm, resolved, started)
        state, extra = pending(self.routes, user,
                               org_plan.name if org_plan is not None else None, realm)
        wait = max_wait(resolved)
        charged: list[Charged] = []
        if extra or wait:   # the route's own limits, in the same call; a slot to give back
            outcome = engine.acquire_with(user, client_ip(), resolved, realm, extra, org_plan,
                                          wait)
            decision, charged = outcome.decision, outcome.charged
        else:
            decision = engine.acquire(user, client_ip(), resolved, realm, org_plan)
        record(decision, user, started, resolved.name)
        request_limits().decision = decision
        if decision.allowed:
            if not wait_for_slot(decision, user):
                engine.refund(charged)   # hung up while waiting: the slot goes back
                raise ClientGone()
            keep(state, charged)
            return decision
        remember_refusal(self.deny, engine, decision, user, realm, resolved, plan, started)
        raise refusal_error(Refused(decision))

    def reserve(self, user: str, model: str, input_tokens: int, max_output_tokens: int,
                plan: str | None = None, *, anonymous: bool = False,
                terms: PriceTerms = STANDARD, renews: bool = True,
                key_id: str | None = None, org: str | None = None) -> Reservation:
        """Charge one request, reserve its tokens/dollars/lease, and pass the model's guard.

        Raises RateLimited (the user's layers), UpstreamSaturated (the model's guard: the
        user is charged nothing) or LimiterUnavailable. Use what it returns as a context
        manager (``with limiter.reserve(...) as r: ... r.settle(usage)``): it renews the
        lease and finishes by the billing rule however the block ends. ``terms`` (service
        tier, cache writes, server tools) price the call beyond its tokens; ``renews=False``
        for an answer made in this process, which cannot outlive its lease; ``key_id``: the
        API key it came with, for the spend ledger. ``org``: an API key's org (else the
        user's own, from [users]); its layers are charged with the user's.
        """
        started = time.perf_counter()
        engine = self.engine
        policy = engine.policy
        ask = Ask(model, policy.model(model), input_tokens, max_output_tokens, terms, key_id)
        limits = request_limits()
        realm = BODY_USER if anonymous else KEY_USER
        org_plan = policy.org_of(user, org)
        resolved = policy.resolve(user, plan, realm)
        refuse_if_denied(self.deny, user, realm, resolved, started)
        state, extra = pending(self.routes, user,
                               org_plan.name if org_plan is not None else None, realm)
        charged: list[Charged] = []
        try:
            reservation = engine.reserve(user, resolved, ask, ip=client_ip(), realm=realm,
                                         renews=renews, org=org_plan, extra=extra,
                                         charged=charged, max_wait=max_wait(resolved))
        except GuardRefused as guard:
            limits.decision = guard.decision
            record_guard(guard, user, started, resolved.name)
            raise refusal_error(guard) from None
        except Refused as refused:
            limits.decision = refused.decision
            record(refused.decision, user, started, resolved.name)
            remember_refusal(self.deny, engine, refused.decision, user, realm, resolved,
                             plan, started)
            raise refusal_error(refused) from None
        limits.decision = reservation.decision
        record(reservation.decision, user, started, resolved.name)
        if not wait_for_slot(reservation.decision, user):
            reservation.refund_everything()   # hung up while waiting: the slot goes back
            if extra and not engine.store.single_node:
                engine.refund(charged)        # the route's, charged in calls of their own
            raise ClientGone()
        keep(state, charged)
        return reservation

    def observe_upstream(self, model: str, headers: Mapping[str, str], status: int,
                         tokens: int = 0) -> None:
        """Let the model's guard learn from a provider response (its rate-limit headers);
        ``tokens``: what the call that got it reserved."""
        if self._observer is None:
            self._observer = Observer(self.engine.observe_args, max_hold=self.engine.max_hold)
        self._observer.submit(model, headers, status, tokens)

    def plan_of_user(self, user: str, key_plans: Mapping[str, str] | None = None,
                     realm: str | None = None) -> Plan:
        """The plan ``user`` is served on, for operators (``limits show|reset``,
        /admin/usage): their newest live key's, else [users]/default, with the override of
        ``realm`` (BODY_USER: the /chat user_id's, which no key names). ``key_plans`` (from
        ``keys.plans_by_user()``) saves a scan of every key when asking for many users."""
        if key_plans is None:
            key_plans = self.keys.plans_by_user(user)
        key_plan = None if realm == BODY_USER else key_plans.get(user)
        return self.policy.resolve(user, key_plan, realm)

    def org_of_user(self, user: str, key_orgs: Mapping[str, str | None] | None = None
                    ) -> Plan | None:
        """The org ``user``'s requests are charged to, for operators: their newest live
        key's, else [users]'s. ``key_orgs``: from ``keys.orgs_by_user()``."""
        if key_orgs is None:
            key_orgs = self.keys.orgs_by_user(user)
        return self.policy.org_of(user, key_orgs.get(user))

    def realm_of_user(self, user: str, key_plans: Mapping[str, str] | None = None,
                      anonymous: bool | None = None) -> str:
        """Which of ``user``'s two namespaces an operator means: the API key user's when they
        hold a live key, else the /chat body user_id's (``anonymous`` forces one)."""
        if anonymous is None:
            if key_plans is None:
                key_plans = self.keys.plans_by_user(user)
            anonymous = user not in key_plans
        return BODY_USER if anonymous else KEY_USER

    def plan(self, *, user: Callable[[], str] | None = None, user_from: UserFrom | None = None,
             key_setting: str | None = None, read_key: KeyReader | None = None,
             render: Render | None = None) -> Callable[[F], F]:
        """Charge a view to the user's plan: ``@limiter.plan(user=lambda: ...)`` charges
        ``user()`` before the view; ``@limiter.plan(user_from="key" | "<body field>")``
        declares who pays for a view that charges itself (see :func:`limiting.plan`)."""
        return declare(lambda: self, user=user, user_from=user_from, key_setting=key_setting,
                       read_key=read_key, render=render)

    def exempt(self, target: E) -> E:
        """Keep a view or blueprint (health checks, metrics) out of the edge limits and of
        every route limit (decorators and [routes]); usable as a decorator."""
        exempt_routes(target)
        if self.edge is not None:
            self.edge.exempt(cast(Any, target))
        return target

    # The route decorators (limiting.web.routes): also importable without a limiter, for
    # reusable blueprints, as ``from limiting import token_bucket, sliding_window``
    # (and ``limiting.plan`` for this ``plan``).
    token_bucket = staticmethod(route_bucket)
    sliding_window = staticmethod(route_window)


def current_limiter() -> RateLimiter:
    """The RateLimiter of the running app, for blueprints that do not import an instance."""
    return cast(RateLimiter, current_app.extensions[EXTENSION_KEY])


def _audit_reloads(policy: Policy, store: Store) -> None:
    """A worker that gunicorn's master started on its checked copy of the policy puts the
    master's reloads (kept beside that copy) in the audit trail; never fails a start."""
    source = Path(policy.source)
    if source.name != KEPT:
        return
    try:
        record_reloads(store, source.parent)
    except Exception:
        logging.getLogger("limiter.audit").warning("policy reloads not audited", exc_info=True)


def _setting(app: Flask, name: str, default: str) -> str:
    value = app.config.get(name)
    if value is None:
        value = os.environ.get(name, default)
    return str(value)


def _after_request(edge_after: AfterHook | None) -> AfterHook:
    """The extension's one after_request hook (each hook Flask runs costs on every request):
    our headers, then Flask-Limiter's own hook on the routes it checked."""
    if edge_after is None:
        return lambda response: _add_headers(response, request_limits())

    def after_request(response: Response) -> Response:
        limits = request_limits()
        response = _add_headers(response, limits)
        return response if limits.is_limited_route() else edge_after(response)

    return after_request


def _add_headers(response: Response, limits: RequestLimits) -> Response:
    decision = limits.decision
    if decision is None and limits.is_limited_route():
        # Turned away before acquire (bad input): the edge still counts the attempt.
        decision = current_limiter().engine.charge_edge(client_ip())
        if decision is not None and not decision.allowed:
            return _render_refusal(RateLimited.from_decision(decision,
                                                             rate_limit_headers(decision)))
    if decision is not None and response.status_code != 429 and "RateLimit" not in response.headers:
        # A view that set them (the /v1 dialects do) keeps its own; otherwise they are new,
        # and join the header list as it is sent (SendLimitHeaders).
        limits.headers = list(rate_limit_headers(decision).items())
    rid = limits.request_id
    if rid is not None:
        response.headers["X-Request-ID"] = rid
    return response


def _render_refusal(exc: RateLimited | LimiterUnavailable | UpstreamSaturated | ExceedsLimit
                    ) -> Response:
    if isinstance(exc, (RateLimited, ExceedsLimit)) and exc.limit_headers:
        # Our own header values: they join the WSGI list as sent (SendLimitHeaders), as an
        # admitted response's do; a refusal under abuse is the hot path.
        request_limits().headers = [(name, value) for name, value in exc.limit_headers.items()
                                    if name != "Retry-After"]
    return json_response(exc.code or 429, exc.body(), None, exc.retry_after)
