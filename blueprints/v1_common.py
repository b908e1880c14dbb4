"""What /v1/chat/completions and /v1/messages share: keys, body checks, running an upstream
call inside its reservation, and SSE relaying.

Each endpoint answers errors in its provider's shape, so failures travel as one neutral
:class:`ApiProblem` that the endpoint renders; nothing here knows either wire format.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from flask import Response, stream_with_context
from werkzeug.exceptions import BadRequest, HTTPException, RequestEntityTooLarge

from limiting import (
    IMAGE_TOKENS,
    STANDARD,
    Decision,
    ExceedsLimit,
    KeyRecord,
    LimiterUnavailable,
    ModelPolicy,
    Plan,
    PriceTerms,
    RateLimited,
    Reservation,
    StoreUnavailable,
    UnpricedContent,
    UpstreamSaturated,
    Usage,
    client_ip,
    current_limiter,
    estimate_input_tokens,
    estimate_tokens,
    json_response,
    rate_limit_headers,
    request_limits,
)
from providers import UnknownModel, UpstreamError
from providers.llm_calls import Observe, Tally, UpstreamReply, UpstreamStream

from .validation import json_object

log = logging.getLogger("limiter.v1")

# No model generates more in one answer (the largest allow ~128k); 10**400 is an attack.
MAX_TOKENS_CAP = 1_000_000

# Neutral kinds of problem; each endpoint maps them to its provider's error types.
AUTH = "authentication"
INVALID = "invalid_request"
NOT_FOUND = "not_found"
TOO_LARGE = "too_large"
RATE_LIMITED = "rate_limited"
SATURATED = "upstream_saturated"
UNAVAILABLE = "unavailable"
UPSTREAM = "upstream"
INTERNAL = "internal"


class ApiProblem(Exception):
    """A refusal or failure, before it is dressed in a provider's error shape."""

    def __init__(self, status: int, kind: str, message: str, *, param: str | None = None,
                 code: str | None = None, retry_after: int | None = None,
                 headers: Mapping[str, str] | None = None, layer: str | None = None,
                 unit: str = "requests") -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message
        self.param, self.code, self.retry_after, self.layer = param, code, retry_after, layer
        self.unit = unit          # what the refusing layer counts, for the dialect's type
        self.headers = dict(headers or {})


def invalid(message: str, param: str | None = None) -> ApiProblem:
    return ApiProblem(400, INVALID, message, param=param, code="invalid_request")


def problem_from(exc: BaseException) -> ApiProblem:
    """Any exception of a /v1 request as a problem; unknown ones are logged as 500s."""
    if isinstance(exc, ApiProblem):
        return exc
    if isinstance(exc, RateLimited):
        return ApiProblem(429, RATE_LIMITED, str(exc.description), layer=exc.layer,
                          unit=exc.unit,
                          code="rate_limit_exceeded", retry_after=_seconds(exc.retry_after),
                          headers=exc.limit_headers)
    if isinstance(exc, ExceedsLimit):   # before HTTPException: its code is exceeds_limit
        return ApiProblem(400, INVALID, str(exc.description), code="exceeds_limit",
                          layer=exc.layer, headers=exc.limit_headers)
    if isinstance(exc, UpstreamSaturated):
        return ApiProblem(429, SATURATED, str(exc.description), code="upstream_saturated",
                          retry_after=_seconds(exc.retry_after) or 1,
                          layer=f"upstream:{exc.model}")
    if isinstance(exc, (LimiterUnavailable, StoreUnavailable)):
        retry = getattr(exc, "retry_after", 1) or 1
        return ApiProblem(503, UNAVAILABLE, "The rate limiter's store is unavailable; "
                          "retry shortly.", code="limiter_unavailable", retry_after=retry)
    if isinstance(exc, UpstreamError):
        kind = INVALID if exc.status < 500 else UPSTREAM
        return ApiProblem(exc.status, kind, exc.message, code=exc.code,
                          retry_after=exc.retry_after)
    if isinstance(exc, UnknownModel):
        return ApiProblem(404, NOT_FOUND, str(exc), param="model", code="model_not_found")
    if isinstance(exc, RequestEntityTooLarge):
        return ApiProblem(413, TOO_LARGE, "The request body is too large.",
                          code="request_too_large")
    if isinstance(exc, HTTPException) and exc.code and exc.code < 500:
        return ApiProblem(exc.code, INVALID, str(exc.description), code="invalid_request")
    log.exception("unhandled error in /v1: %s", type(exc).__name__, exc_info=exc)
    return ApiProblem(500, INTERNAL, "The server had an error processing this request.",
                      code="internal_error")


def render_problem(problem: ApiProblem, body: dict[str, Any]) -> Response:
    """A problem as JSON in the endpoint's own shape, with its status and headers."""
    return json_response(problem.status, body, problem.headers, problem.retry_after)


def _seconds(value: object) -> int | None:
    """Whole seconds for Retry-After; werkzeug types the attribute loosely."""
    return value if isinstance(value, int) and value > 0 else None


def refusal(exc: BaseException, dialect: Callable[[Decision], dict[str, str]]) -> ApiProblem:
    """The problem to answer with. A request turned away before reserve() still counts at the
    edge (as the app's after_request would); counting it here lets an edge refusal speak the
    provider's shape, and the decision in request_limits() keeps it from counting twice. Our
    429s also carry the provider-style headers of the refusing decision."""
    problem = problem_from(exc)
    limits = request_limits()
    decision = limits.decision
    if decision is None:
        decision = current_limiter().engine.charge_edge(client_ip())
        if decision is not None:
            limits.decision = decision
            if not decision.allowed:
                problem = problem_from(RateLimited.from_decision(
                    decision, rate_limit_headers(decision)))
    if problem.kind == RATE_LIMITED and decision is not None:
        problem.headers = {**dialect(decision), **problem.headers}
    return problem


# --- who is calling, and what they sent -----------------------------------------------------------


def authenticate(token: str | None) -> KeyRecord:
    if not token:
        raise ApiProblem(401, AUTH, "No API key provided.", code="invalid_api_key")
    try:
        record = current_limiter().keys.authenticate(token)
    except StoreUnavailable as exc:
        raise problem_from(exc) from None
    if record is None:
        raise ApiProblem(401, AUTH, "Incorrect or revoked API key provided.",
                         code="invalid_api_key")
    return record


def read_body() -> dict[str, Any]:
    try:
        return json_object()
    except RequestEntityTooLarge:
        raise
    except BadRequest as exc:
        raise invalid(str(exc.description)) from None


def model_field(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise invalid("'model' is required and must be a non-empty string.", "model")
    return model


def optional_bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be a boolean.", name)
    return value


def optional_positive_int(body: Mapping[str, Any], name: str,
                          most: int = MAX_TOKENS_CAP) -> int | None:
    """An integer in 1..``most``: beyond it no model answers, and an unbounded one (10**400)
    would overflow the dollar estimate, so it is the caller's 400, never our 500."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise invalid(f"'{name}' must be an integer from 1 to {most:,}.", name)
    return value


def messages_field(body: Mapping[str, Any], *, null_content_ok: bool = False
                   ) -> list[dict[str, Any]]:
    """A non-empty list of {role: str, content: str | list} objects.

    ``null_content_ok``: OpenAI lets an assistant turn that only calls tools have no content.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array.", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid(f"'messages[{i}]' must be an object with a string 'role'.",
                          f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, (str, list)):
            continue
        if content is None and null_content_ok and message["role"] == "assistant":
            continue
        raise invalid(f"'messages[{i}].content' must be a string or an array.",
                      f"messages[{i}].content")
    return messages


def unknown_fields(body: Mapping[str, Any], known: frozenset[str]) -> None:
    """Refuse fields we would not forward: silently dropping them would change the answer."""
    for name in body:
        if name not in known:
            raise invalid(f"Unrecognized request argument supplied: {name}", name)


def estimate(messages: list[dict[str, Any]], system: Any = None, tools: Any = None, *,
             functions: Any = None, response_format: Any = None,
             model: ModelPolicy | None = None) -> int:
    """Offline input estimate. Tool and function definitions and a response schema count:
    the provider puts them in the prompt and bills them as input; so do images, at the
    model's ``image_tokens`` each. Content that cannot be priced before the call is a 400."""
    image_tokens = model.image_tokens if model is not None else IMAGE_TOKENS
    try:
        total = estimate_input_tokens(messages, system, image_tokens)
    except UnpricedContent as exc:
        raise invalid(str(exc), "messages") from None
    for schema in (tools, functions, response_format):
        if schema:
            total += estimate_tokens(json.dumps(schema, default=str))
    return total


def plan_of(record: KeyRecord) -> Plan:
    """The key's plan, as reserve() will charge it (a plan that left the policy: the
    default plan)."""
    return current_limiter().policy.resolve(record.user, record.plan)


def reserve(record: KeyRecord, model: str, input_tokens: int, max_output: int, *,
            terms: PriceTerms = STANDARD) -> Reservation:
    return current_limiter().reserve(record.user, model, input_tokens, max_output,
                                     plan=record.plan, terms=terms)


def observer(model: str) -> Observe:
    """Feeds provider headers to the model's guard; a failure there never fails the call."""
    limiter = current_limiter()

    def observe(headers: Mapping[str, str], status: int, tokens: int = 0) -> None:
        try:
            limiter.observe_upstream(model, headers, status, tokens)
        except Exception:
            log.warning("observe_upstream failed for %s", model, exc_info=True)

    return observe


def limit_headers(reservation: Reservation,
                  dialect: Callable[..., dict[str, str]], *args: Any) -> dict[str, str]:
    """Ours (RateLimit*, X-RateLimit-*) plus the provider dialect's, from the reservation."""
    decision = reservation.decision
    return {**rate_limit_headers(decision), **dialect(decision, *args)}


# --- the reservation's life (its rule lives in limiting.reservation) ------------------------------


def sse_response(relay: Iterator[str], tally: Tally, reservation: Reservation,
                 close_upstream: Callable[[], None],
                 error_event: Callable[[ApiProblem], str], headers: Mapping[str, str]
                 ) -> Response:
    """Stream ``relay`` as text/event-stream. However it ends (done, upstream error, client
    gone, never started) the request was sent, so it is charged: the provider's final usage
    when it came, else as reserved (``Tally.charge``); the reservation finishes once."""

    def finish() -> None:
        if reservation.done:
            return
        try:
            close_upstream()
        except Exception:
            log.debug("closing the upstream stream failed", exc_info=True)
        # Reservation logs and survives a store error itself; the lease then ages out.
        tally.charge(reservation)

    def run() -> Iterator[str]:
        # Settle before the last event goes out, so a client that has read the whole stream
        # already sees its real usage in the next request's headers.
        try:
            for text in relay:
                if tally.complete or tally.failed:
                    finish()
                yield text
        except Exception as exc:   # after the first byte, errors travel as an SSE event
            tally.failed = True
            finish()
            yield error_event(problem_from(exc))
        finally:            # GeneratorExit (client gone) lands here too
            finish()

    response = Response(stream_with_context(run()), mimetype="text/event-stream")
    response.headers.update(headers)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    response.call_on_close(finish)   # a generator closed before its first step runs no finally
    return response


def run_plain(reservation: Reservation, call: Callable[[], UpstreamReply],
              usage_of: Callable[[Any], Usage | None], renew: bool = True) -> UpstreamReply:
    """One whole upstream call inside the reservation: settled to the provider's reported
    usage; a failure or a reply without usage follows the reservation rule. ``renew`` False
    for answers made in-process (echo), which cannot outlive a lease."""
    reservation.renews = renew
    with reservation:
        reply = call()
        try:
            usage = usage_of(reply.json())
        except ValueError:
            usage = None
        if usage is not None:
            reservation.settle(usage)
    return reply


def open_stream(reservation: Reservation, call: Callable[[], UpstreamStream],
                renew: bool = True) -> UpstreamStream:
    """Open the upstream stream (its HTTP errors are still plain errors) with the lease being
    renewed; a failure to open finishes the reservation by the rule."""
    reservation.renews = renew
    reservation.start_renewal()
    try:
        return call()
    except BaseException as exc:
        reservation.finish(exc)
        raise


def json_reply(reply: UpstreamReply, headers: Mapping[str, str]) -> Response:
    """The provider's body as it sent it, with our headers."""
    response = Response(reply.body, status=200, mimetype="application/json")
    response.headers.update(headers)
    return response
