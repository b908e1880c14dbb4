"""What the limiter knows about the request being served, in one typed object.

Written by the extension (the decision), the logs (the request id) and the edge (is this a
limited route?), read by the after_request hook and the /v1 dialects. It lives in the WSGI
environ, so it is the request's own even when tests reuse one app context for many requests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flask import current_app, request

from ..core.decision import Decision

_KEY = "limiting.request"
# The attribute mark_limited() sets on a view whose acquire() call counts the edge.
LIMITED_ROUTE = "_llm_limited_route"
# The attribute RateLimiter.exempt sets on a view or Blueprint the edge does not count.
EDGE_EXEMPT = "_llm_edge_exempt"


@dataclass(slots=True)
class RequestLimits:
    """The limiter's state for one request."""

    decision: Decision | None = None     # the user's decision (or the edge's, for bad input)
    request_id: str | None = None        # X-Request-ID: the caller's, or one of ours
    limited_route: bool | None = None    # None until asked: does the view call acquire()?
    edge_hooks_off: bool | None = None   # None until asked: see edge_hooks_idle()
    headers: list[tuple[str, str]] | None = None   # RateLimit*, sent by SendLimitHeaders
    routes: Any = None                   # the route's limits (limiting.web.routes.RouteState)
    payer: Any = None                    # who pays, resolved once (limiting.web.gate.Payer)
    deciding_ms: float | None = None     # time spent deciding: Server-Timing's limiter;dur

    def is_limited_route(self) -> bool:
        """Does the view call acquire() (so its edge check rides in that call)? Asked by up
        to four hooks per request: looked up once."""
        limited = self.limited_route
        if limited is None:
            view = current_app.view_functions.get(request.endpoint or "")
            limited = self.limited_route = bool(getattr(view, LIMITED_ROUTE, False))
        return limited

    def edge_hooks_idle(self) -> bool:
        """Have Flask-Limiter's hooks nothing to do here? True on a limited route (its call
        counts the edge) and on a view, or a view's own Blueprint, that RateLimiter.exempt
        marked: Flask-Limiter would resolve its limits before it saw the exemption, which
        costs a probe about what our whole decision costs."""
        idle = self.edge_hooks_off
        if idle is None:
            idle = self.is_limited_route()
            if not idle:
                view = current_app.view_functions.get(request.endpoint or "")
                blueprint = current_app.blueprints.get(request.blueprint or "")
                idle = getattr(view, EDGE_EXEMPT, False) or getattr(blueprint, EDGE_EXEMPT,
                                                                     False)
            self.edge_hooks_off = idle = bool(idle)
        return idle


def server_timing(ms: float) -> tuple[str, str]:
    """W3C Server-Timing for the limiter's part of a response: the time spent deciding."""
    return "Server-Timing", f"limiter;dur={ms:.2f}"


def request_limits() -> RequestLimits:
    """The current request's RequestLimits, made on first use."""
    environ = request.environ
    limits: RequestLimits | None = environ.get(_KEY)
    if limits is None:
        limits = environ[_KEY] = RequestLimits()
    return limits


StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class SendLimitHeaders:
    """WSGI middleware: the RateLimit headers the after_request hook chose join the
    response's header list as it is sent. Every limited response carries five; added to a
    werkzeug Response each is checked and copied again (~4 µs a response), and these are
    values we wrote ourselves."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse
                 ) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            limits: RequestLimits | None = environ.get(_KEY)
            if limits is not None:
                if limits.headers:
                    headers.extend(limits.headers)
                if limits.deciding_ms is not None:
                    headers.append(server_timing(limits.deciding_ms))
            return start_response(status, headers, exc_info)

        return self.app(environ, start)
