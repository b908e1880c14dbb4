"""Refusing at the door: a caller this worker's deny cache (limiting/deny.py) holds is answered
its 429 before Flask builds a request — WSGI middleware inside ProxyFix, so the client address
is the one the edge counts.

Under abuse the refusal is the hot path, and in Flask it costs more than the bare app's whole
200 (request and app contexts, URL matching, hooks, the view's body parsing, an exception and
its handler, the response object). Here it costs a route lookup, a dict lookup or two and a
response written from the cached decision: the same status, JSON body and headers (RateLimit,
X-RateLimit-*, Retry-After counted down, X-Request-ID) the view would have sent.

It answers only on routes whose view declares where its user comes from
(``plan(user_from=...)``, payer.py, which builds the route's :class:`Early`): the API key it
reads from the headers (a key user) or, anonymous, a string field of its JSON body, and how it
renders a refused decision (default: the limiter's own JSON 429). What it answers from:

- an edge refusal of the client IP (any request on such a route carries the edge in its call);
- a plan refusal of the caller, found through what the refused request presented: its API key,
  or its body field (``DenyCache.alias``, learned only from what the view itself decided). The
  plan is resolved again here, so an override or reload in between means "ask the store".

Everything else — a caller not yet refused here, an app that routes by host or subdomain, a
body over 64 KiB — goes on to Flask unchanged (a body read here is handed on).

Where it answers differently from Flask, and only for a caller genuinely held: whatever else
Flask would have found wrong first — an invalid body or model (400, 404), a user_id not the
key's (403), a key revoked since (401), a body over MAX_CONTENT_LENGTH (413), a bad
X-RateLimit-Max-Wait (400) — it is refused 429 until its entry ends (a second at most):
either way it gets no work done. Flask counts
such a bad request at the edge; here it is not counted (no refusal answered without the store
is). And an IP held at the edge whose caller is held too may be told the caller's refusal
where Flask would tell it the edge's.
(tests/test_door_differential.py compares the two paths request by request.)
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from flask import Flask, Response
from werkzeug.datastructures import EnvironHeaders
from werkzeug.exceptions import HTTPException

from ..core.decision import Decision, Refused
from ..core.naming import BODY_USER, KEY_USER
from ..core.policy import Policy
from ..deny import DenyCache
from ..keys import presented_key
from .context import LIMITED_ROUTE, StartResponse, WSGIApp, server_timing
from .errors import RateLimited, json_text, refusal_error
from .logs import request_id_for

log = logging.getLogger("limiter.door")
Answer = tuple[str, list[tuple[str, str]], bytes]

# The attribute plan(user_from=...) sets on a view (payer.py).
EARLY = "_llm_early"
MAX_ROUTES = 4096          # (method, path, host) lookups remembered; beyond, matched each time
MAX_PEEK = 64 * 1024       # a larger body is the view's to read
_STATUS = "429 TOO MANY REQUESTS"   # as werkzeug writes it


@dataclass(frozen=True, slots=True)
class Early:
    """How a view names its caller and renders a refusal, for the door: built by
    ``plan(user_from=...)`` from what the view declares (payer.py), never written by hand.

    ``key``: the API key a request presents, as the view reads it (default: Bearer, else
    X-API-Key); ``body_user``: the JSON body field naming an anonymous caller (None: key users
    only); ``render``: the view's response to a refused decision (default: the limiter's JSON
    429), called with no request context; ``uses_key``: whether the view names its caller by
    that key at all in a given app (None: in every app), asked once per route — a view that
    ignores keys in some apps (/chat without REQUIRE_API_KEY) must not have a held key the
    request also presents refuse the body's user, whom it would serve."""

    body_user: str | None = None
    key: Callable[[Any], str | None] = presented_key
    render: Callable[[Decision], Response] | None = None
    uses_key: Callable[[Flask], bool] | None = None


def mark_early(view: Any, early: Early) -> Any:
    setattr(view, EARLY, early)
    return view


def early_of(view: Any) -> Early | None:
    """What the view declared to the door, if anything (and it calls acquire itself)."""
    if view is None or not getattr(view, LIMITED_ROUTE, False):
        return None
    return getattr(view, EARLY, None)


def learn_alias(deny: DenyCache, early: Early, headers: Any, realm: str, user: str,
                key_plan: str | None) -> None:
    """After the store refused ``user`` on an early view: remember what this request presented
    that named them, so the next such request can be refused at the door."""
    if realm == KEY_USER:
        presented = early.key(headers)
        if presented:
            deny.alias(("key", presented), realm, user, key_plan)
    elif realm == BODY_USER and early.body_user is not None:
        deny.alias(("body", early.body_user, user), realm, user, None)


class Holds(Protocol):
    """The gate's door-side question (limiting/web/gate.py, which imports this module)."""

    def held_at(self, ip: str, patience: float,
                named: Callable[[], tuple[str, str, str | None] | None],
                policy: Policy) -> Decision | None: ...


class Door:
    """``app.wsgi_app = Door(app.wsgi_app, app, deny, policy, gate)``."""

    def __init__(self, wsgi_app: WSGIApp, app: Flask, deny: DenyCache, policy: Policy,
                 gate: Holds) -> None:
        self.wsgi_app = wsgi_app
        self.app = app
        self.deny = deny
        self.gate = gate
        self.policy = policy   # a worker's for its life (overrides pick among its plans)
        # The longest any plan may wait: an edge entry answers here only past it (the
        # caller's plan, and so its own patience, is not known yet).
        self.patience = max((p.max_wait_seconds for p in policy.plans.values()), default=0.0)
        self._routes: dict[tuple[str, str, str, str], Early | None] = {}
        self._failed = False   # logged once per process

    def __call__(self, environ: dict[str, Any], start_response: StartResponse
                 ) -> Iterable[bytes]:
        if self.deny:   # nothing refused lately: one test, and on to Flask
            try:
                answered = self._answer(environ, start_response)
            except Exception:   # never a 500 from here: the view decides instead
                if not self._failed:
                    self._failed = True
                    log.exception("refusing at the door failed; Flask answers instead")
                answered = None
            if answered is not None:
                return answered
        return self.wsgi_app(environ, start_response)

    def _answer(self, environ: dict[str, Any], start_response: StartResponse
                ) -> Iterable[bytes] | None:
        early = self._early(environ)
        started = time.perf_counter()
        decision = None if early is None else self._refusal(environ, early)
        if early is None or decision is None:
            return None
        rid = request_id_for(environ.get("HTTP_X_REQUEST_ID", ""))
        timing = server_timing((time.perf_counter() - started) * 1000)
        if early.render is not None:
            response = early.render(decision)
            response.headers["X-Request-ID"] = rid
            response.headers.add(*timing)
            return response(environ, start_response)
        status, headers, body = render(decision, rid)
        headers.append(timing)
        start_response(status, headers)
        return [body]

    def _refusal(self, environ: dict[str, Any], early: Early) -> Decision | None:
        """The cached refusal this request meets (counted and logged by the gate), or None."""
        ip = environ.get("REMOTE_ADDR") or "unknown"
        return self.gate.held_at(ip, self.patience, lambda: self._named(environ, early),
                                 self.policy)

    def _early(self, environ: dict[str, Any]) -> Early | None:
        """The route's Early, or None: looked up once per (method, path, host)."""
        key = (environ.get("REQUEST_METHOD", ""), environ.get("SCRIPT_NAME", ""),
               environ.get("PATH_INFO", ""), environ.get("HTTP_HOST", ""))
        routes = self._routes
        try:
            return routes[key]
        except KeyError:
            pass
        app = self.app
        url_map = app.url_map
        early = None
        # OPTIONS is Flask's own answer (the view never runs); host routing: not ours to guess.
        if key[0] != "OPTIONS" and not (url_map.host_matching or app.subdomain_matching):
            try:
                adapter = url_map.bind_to_environ(
                    environ, server_name=app.config.get("SERVER_NAME"),
                    subdomain=url_map.default_subdomain or None)
                endpoint, _ = adapter.match()
                early = early_of(app.view_functions.get(str(endpoint)))
                if early is not None and early.uses_key is not None \
                        and not early.uses_key(app):
                    early = replace(early, key=no_key)
            except HTTPException:   # not found, wrong method, a redirect: Flask's to answer
                early = None
        if len(routes) < MAX_ROUTES:
            routes[key] = early
        return early

    def _named(self, environ: dict[str, Any], early: Early
               ) -> tuple[str, str, str | None] | None:
        deny = self.deny
        # werkzeug's header view only when there is a key to read (the common abuse has none).
        presented = (early.key(EnvironHeaders(environ))
                     if "HTTP_AUTHORIZATION" in environ or "HTTP_X_API_KEY" in environ else None)
        if presented:
            found = deny.named(("key", presented))
            if found is not None:
                return found
        if early.body_user is None:
            return None
        user = _body_field(environ, early.body_user)
        return None if user is None else deny.named(("body", early.body_user, user))


def render(decision: Decision, request_id: str) -> Answer:
    """The 429 the app's error handler would send for ``decision`` (errors.json_response),
    with ``request_id`` (already checked) as X-Request-ID."""
    exc = refusal_error(Refused(decision))
    assert isinstance(exc, RateLimited)   # the deny cache keeps refusals with a wait only
    body = json_text(exc.body()).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    headers += [(name, value) for name, value in exc.limit_headers.items()
                if name != "Retry-After"]
    headers.append(("Retry-After", str(exc.retry_after)))
    headers.append(("X-Request-ID", request_id))
    return _STATUS, headers, body


def no_key(headers: Any) -> None:
    """The key reader of a view that reads none (in this app, or ever)."""
    return None


def _body_field(environ: dict[str, Any], field: str) -> str | None:
    """A string field of the JSON body, or None; the body is handed on for the view."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return None
    if not 0 < length <= MAX_PEEK:
        return None
    data = environ["wsgi.input"].read(length)
    environ["wsgi.input"] = io.BytesIO(data)
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError):   # the view answers a bad body its own way
        return None
    value = parsed.get(field) if isinstance(parsed, dict) else None
    return value if isinstance(value, str) else None
