"""The Flask extension: ``RateLimiter().init_app(app)``, then ``plan``/``acquire`` on any route."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from flask import Blueprint, Flask, current_app
from flask_limiter import Limiter
from werkzeug.middleware.proxy_fix import ProxyFix

from .. import metrics
from ..alerts import alerts_for
from ..audit import record_reloads
from ..composed import Charged
from ..core.ask import Ask
from ..core.decision import Decision
from ..core.end_users import limited_end_user
from ..core.groups import Group
from ..core.layers import Layer
from ..core.naming import BODY_USER, KEY_USER, EdgeKeys
from ..core.policy import Plan, Policy
from ..core.pricing import STANDARD, PriceTerms
from ..core.shares import per_worker
from ..core.upstream import Observer
from ..deny import DenyCache
from ..engine import Engine
from ..keys import ApiKeys, KeyRecord
from ..ledger import Ledger
from ..overrides import attach, on_change
from ..reloading import KEPT
from ..reservation import Reservation
from ..stores.store import Store
from .alerts_cli import alerts_cli
from .auth_failures import AuthFailures
from .cli import limits_cli
from .configured import app_policy, app_store, setting
from .context import EDGE_EXEMPT, SendLimitHeaders
from .credentials import Credentials, InvalidToken, KeysUnavailable
from .door import Door
from .edge import combines_edge, init_edge
from .errors import ExceedsLimit, LimiterUnavailable, RateLimited, UpstreamSaturated
from .gate import Gate, Passage, payer, render_refusal
from .identity import client_ip
from .keys_cli import keys_cli
from .operated import EXTENSION_KEY
from .payer import KeyReader, Render, UserFrom, declare
from .routes import RouteLimits
from .routes import exempt as exempt_routes
from .routes import sliding_window as route_window
from .routes import token_bucket as route_bucket
from .spend_cli import audit_command, spend_cli

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
        self.credentials: Credentials | None = None
        self.routes = RouteLimits(authenticate=self._authenticates)
        # Every request's way through the limiter (limiting/web/gate.py).
        self.gate = Gate(self)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        policy = app_policy(app, self._policy)
        self.credentials = Credentials.from_config(app, lambda: self.keys,
                                                   lambda: self.policy)
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
        self._engine.alerts = alerts_for(store, self._engine.namespace, policy,
                                         setting(app, "ALERT_WEBHOOK_SECRET", ""),
                                         lambda c: metrics.alert(c.layer, c.threshold))
        if policy.local_fallback:
            from ..stores.memory import MemoryStore

            # gunicorn.conf.py reads the same variable, with the same default.
            workers = int(setting(app, "WEB_CONCURRENCY", "4") or 4)
            self._engine.fallback = Engine(MemoryStore(), per_worker(policy, workers))
        if setting(app, "DENY_CACHE", "1").lower() not in ("0", "false", "no", "off"):
            self.deny = DenyCache()
            on_change(policy, self.deny.clear)   # limits set/unset/reset: ask the store again
            # Inside ProxyFix (added next): the door sees the address the edge counts.
            app.wsgi_app = Door(app.wsgi_app, app, self.deny, policy,  # type: ignore[method-assign]
                                self.gate)
        hops = int(setting(app, "TRUSTED_PROXIES", "0") or 0)
        if hops > 0:
            # Only the last `hops` X-Forwarded-For entries were written by proxies we run;
            # anything before them is the client's claim and must not pick the edge key.
            app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops)  # type: ignore[method-assign]
        # Before the edge's hooks: a route whose call carries the edge is marked first.
        app.before_request(self.gate.before)
        self.edge, self.gate.edge_hooks = init_edge(app, policy, store)
        app.extensions[EXTENSION_KEY] = self
        app.after_request(self.gate.after_hook())
        app.wsgi_app = SendLimitHeaders(app.wsgi_app)  # type: ignore[method-assign]
        for error in (RateLimited, LimiterUnavailable, UpstreamSaturated, ExceedsLimit):
            app.register_error_handler(error, render_refusal)
        app.cli.add_command(limits_cli)
        app.cli.add_command(keys_cli)
        app.cli.add_command(spend_cli)
        app.cli.add_command(audit_command)
        app.cli.add_command(alerts_cli)

    def authenticate(self, presented: str | None) -> KeyRecord | None:
        """The record an API key (or, with JWT_JWKS set, a JWT) names; None: nobody. Raises
        InvalidToken for a JWT it refuses (401, with the reason) and KeysUnavailable when
        the identity provider's keys cannot be read (503)."""
        if self.credentials is None:
            return self.keys.authenticate(presented)
        return self.credentials.authenticate(presented)

    def _authenticates(self, presented: str | None) -> bool:
        try:
            return self.authenticate(presented) is not None
        except (InvalidToken, KeysUnavailable):
            return False

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
                org: str | None = None, end_user: str | None = None,
                tags: Sequence[str] = ()) -> Decision:
        """Charge one request to ``user`` (and their org) or raise RateLimited /
        LimiterUnavailable. ``plan``, ``org``: an API key's (else the user's own).
        ``end_user``: the customer of ``user`` the request is made for, limited by the
        plan's ``end_user`` layers (ignored when it has none; ValueError for an id that is
        not a string of at most 256 characters). ``tags``: the API key's record's (never a
        request's), whose ``[tags]`` limits are charged too.

        ``anonymous``: ``user`` is the client's own claim (a body field), not an authenticated
        user; such ids have limits of their own and never spend an authenticated user's.
        The decision is kept in request_limits() so the response carries its headers.
        """
        engine = self.engine
        who = payer(engine.policy, user, plan, anonymous=anonymous, key_org=org, tags=tags)
        named = limited_end_user(who.plan, end_user)

        def execute(extra: list[Group], wait: float) -> Passage:
            if not (extra or wait):   # the plan (and org) alone: one call, nothing to give back
                return Passage(engine.acquire(user, client_ip(), who.plan, who.realm, who.org,
                                              end_user=named, tags=who.tags))
            # The route's own limits in the same call; a slot to give back.
            outcome = engine.acquire_with(user, client_ip(), who.plan, who.realm, extra,
                                          who.org, wait, end_user=named, tags=who.tags)
            return Passage(outcome.decision, outcome.charged,
                           lambda: engine.refund(outcome.charged))

        return self.gate.admit(who, execute).decision

    def reserve(self, user: str, model: str, input_tokens: int, max_output_tokens: int,
                plan: str | None = None, *, anonymous: bool = False,
                terms: PriceTerms = STANDARD, renews: bool = True,
                key_id: str | None = None, org: str | None = None,
                end_user: str | None = None, tags: Sequence[str] = (),
                fallbacks: bool = False) -> Reservation:
        """Charge one request, reserve its tokens/dollars/lease, and pass the model's guard.

        Raises RateLimited (the user's layers), UpstreamSaturated (the model's guard: the
        user is charged nothing) or LimiterUnavailable. Use what it returns as a context
        manager (``with limiter.reserve(...) as r: ... r.settle(usage)``): it renews the
        lease and finishes by the billing rule however the block ends. ``terms`` (service
        tier, cache writes, server tools) price the call beyond its tokens; ``renews=False``
        for an answer made in this process, which cannot outlive its lease; ``key_id``: the
        API key it came with, for the spend ledger. ``org``: an API key's org (else the
        user's own, from [users]); its layers are charged with the user's. ``end_user``: as
        for :meth:`acquire`; its tokens and dollars are settled as the user's, and the spend
        ledger counts it under the user. ``tags``: the API key's record's, as for
        :meth:`acquire` (the ledger counts each one's spend). ``fallbacks``: the model's
        fallbacks (its policy's ``fallbacks``) may serve the request when it would be
        refused; then ``reservation.served_model`` names the model to call.
        """
        engine = self.engine
        ask = Ask(model, engine.policy.model(model), input_tokens, max_output_tokens, terms,
                  key_id)
        who = payer(engine.policy, user, plan, anonymous=anonymous, key_org=org, tags=tags)
        named = limited_end_user(who.plan, end_user)

        def execute(extra: list[Group], wait: float) -> Passage:
            charged: list[Charged] = []
            reservation = engine.reserve(user, who.plan, ask, ip=client_ip(), realm=who.realm,
                                         renews=renews, org=who.org, extra=extra,
                                         charged=charged, max_wait=wait, end_user=named,
                                         tags=who.tags, fallbacks=fallbacks)

            def give_back() -> None:
                reservation.refund_everything()
                if extra and not engine.store.single_node:
                    engine.refund(charged)        # the route's, charged in calls of their own

            return Passage(reservation.decision, charged, give_back, reservation)

        reservation = self.gate.admit(who, execute).reservation
        assert reservation is not None
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
        # The gate then keeps Flask-Limiter's hooks off it (web/context.edge_hooks_idle).
        setattr(target, EDGE_EXEMPT, True)
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


