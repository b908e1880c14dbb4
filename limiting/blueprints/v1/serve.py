"""One flow for every /v1 dialect: key → body → reservation → upstream (or echo) → settle or
stream → headers. The dialect says how its API names things; what is charged follows the
reservation rule (limiting.reservation) the same way for all of them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from flask import Response, request

from limiting.core.headers import rate_limit_headers
from limiting.core.llm import Usage
from limiting.core.policy import Plan
from limiting.keys import KeyRecord
from limiting.providers.errors import Observe
from limiting.providers.llm_calls import Tally, UpstreamReply, UpstreamStream
from limiting.reservation import Reservation
from limiting.stores.store import StoreUnavailable
from limiting.tracing import span
from limiting.web.credentials import InvalidToken, KeysUnavailable
from limiting.web.extension import current_limiter
from limiting.web.gate import payer

from .dialect import Dialect
from .fields import end_user_field, read_body
from .problems import AUTH, UNAVAILABLE, ApiProblem, problem_from, refusal
from .sse import sse_response

log = logging.getLogger("limiter.v1")

SERVED_MODEL = "X-Limiter-Served-Model"   # set when a fallback model served the request
FALLBACK = "X-Limiter-Fallback"           # "off": a client may only turn fallbacks off


def serve(dialect: Dialect) -> Response:
    """The current request answered in ``dialect``; any failure in its error shape."""
    try:
        return _serve(dialect)
    except Exception as exc:
        return dialect.render(refusal(exc, dialect.provider_headers))


def _serve(dialect: Dialect) -> Response:
    record = authenticate(dialect.api_key(request.headers))
    body = read_body()
    call = dialect.parse(body, lambda: plan_of(record).default_max_tokens)
    end_user = end_user_field(plan_of(record), lambda: dialect.end_user(body))
    reservation = current_limiter().reserve(
        record.user, call.model, call.estimate, call.reserved_output, plan=record.plan,
        org=record.org, terms=call.terms, key_id=record.key_id, end_user=end_user,
        tags=record.tags,
        renews=call.provider != "echo",   # an answer made in-process cannot outlive its lease
        fallbacks=request.headers.get(FALLBACK, "").strip().lower() != "off")
    decision = reservation.decision
    headers = {**rate_limit_headers(decision), **dialect.provider_headers(decision)}
    if reservation.served_model is not None:
        # Only a model the policy lists as a fallback of the asked one, of its provider.
        call = call.served_as(reservation.served_model)
        headers[SERVED_MODEL] = reservation.served_model
    api, observe = dialect.api, observer(call.model)
    if not call.stream:
        answer = run_plain(reservation, lambda: api.answer(call, observe), api.usage)
        return json_reply(answer, headers)
    upstream = open_stream(reservation, lambda: api.open(call, observe))
    tally = Tally()
    return sse_response(dialect.relay(upstream, tally, call), tally, reservation,
                        upstream.close, dialect.error_event, headers)


def authenticate(token: str | None) -> KeyRecord:
    if not token:
        raise ApiProblem(401, AUTH, "No API key provided.", code="invalid_api_key")
    try:
        record = current_limiter().authenticate(token)
    except InvalidToken as exc:
        raise ApiProblem(401, AUTH, str(exc), code="invalid_api_key") from None
    except KeysUnavailable:
        raise ApiProblem(503, UNAVAILABLE, "The identity provider's keys cannot be read; "
                         "retry shortly.", code="identity_unavailable", retry_after=5) from None
    except StoreUnavailable as exc:
        raise problem_from(exc) from None
    if record is None:
        raise ApiProblem(401, AUTH, "Incorrect or revoked API key provided.",
                         code="invalid_api_key")
    return record


def plan_of(record: KeyRecord) -> Plan:
    """The key's plan, as reserve() will charge it (a plan that left the policy: the
    user's own): resolved once for the request, and reserve() charges the same payer."""
    return payer(current_limiter().policy, record.user, record.plan, key_org=record.org,
                 tags=record.tags).plan


def observer(model: str) -> Observe:
    """Feeds provider headers to the model's guard; a failure there never fails the call."""
    limiter = current_limiter()

    def observe(headers: Mapping[str, str], status: int, tokens: int = 0) -> None:
        try:
            limiter.observe_upstream(model, headers, status, tokens)
        except Exception:
            log.warning("observe_upstream failed for %s", model, exc_info=True)

    return observe


# --- the reservation's life (its rule lives in limiting.reservation) ------------------------------


def run_plain(reservation: Reservation, call: Callable[[], UpstreamReply],
              usage_of: Callable[[Any], Usage | None]) -> UpstreamReply:
    """One whole upstream call inside the reservation: settled to the provider's reported
    usage; a failure or a reply without usage follows the reservation rule."""
    with reservation:
        with span("limiter.upstream", {"llm.model": reservation.model_name}):
            reply = call()
        try:
            usage = usage_of(reply.json())
        except ValueError:
            usage = None
        if usage is not None:
            reservation.settle(usage)
    return reply


def open_stream(reservation: Reservation, call: Callable[[], UpstreamStream]
                ) -> UpstreamStream:
    """Open the upstream stream (its HTTP errors are still plain errors) with the lease being
    renewed; a failure to open finishes the reservation by the rule."""
    reservation.start_renewal()
    try:
        with span("limiter.upstream", {"llm.model": reservation.model_name,
                                       "llm.stream": True}):
            return call()
    except BaseException as exc:
        reservation.finish(exc)
        raise


def json_reply(reply: UpstreamReply, headers: Mapping[str, str]) -> Response:
    """The provider's body as it sent it, with our headers."""
    response = Response(reply.body, status=200, mimetype="application/json")
    response.headers.update(headers)
    return response
