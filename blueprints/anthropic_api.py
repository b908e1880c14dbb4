"""POST /v1/messages — Anthropic-compatible, plain and streamed, behind every layer.

Auth is ``x-api-key`` or ``Authorization: Bearer`` (the anthropic 2.x SDK sends Bearer).
Flow: key → body checks (``max_tokens`` is required, as upstream) → one reservation of the
user's layers and the model's guard (input estimate + max_tokens) → upstream (or ``echo``) →
settle what the provider reported: input = input_tokens + cache_read_input_tokens +
cache_creation_input_tokens (the whole prompt), cached = cache_read_input_tokens.

Errors, all ``{"type": "error", "error": {"type", "message"}}``:
  401 authentication_error · 400 invalid_request_error (unknown fields refused, as Anthropic
  does) · 404 not_found_error (unknown model) · 413 request_too_large · 429 rate_limit_error
  with Retry-After for our layers · 429 rate_limit_error whose message says the model's
  upstream is saturated (the shared guard refused): chosen over 503/529 overloaded_error so
  clients see one retryable status with an honest Retry-After for every limiter refusal, the
  same as /v1/chat/completions · 503 api_error when the limiter's store is away ·
  502 api_error / 503 overloaded_error / 504 timeout_error for upstream failures.
After the first streamed byte an error is one ``event: error`` that ends the stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from typing import Any

from flask import Blueprint, Response, request

from limiting import (
    ModelPolicy,
    Policy,
    PriceTerms,
    PricingError,
    anthropic_headers,
    bearer_token,
    current_limiter,
    has_cache_control,
    limited_route,
    server_tool_uses,
    tier_multiplier,
)
from providers import (
    UnknownModel,
    UpstreamError,
    check_available,
    echo_llm,
    llm_calls,
    provider_for,
)
from providers.llm_calls import UpstreamStream

from . import v1_common as v1

bp = Blueprint("anthropic_api", __name__)

PASSTHROUGH = frozenset({"system", "temperature", "top_p", "top_k", "stop_sequences",
                         "metadata", "tools", "tool_choice", "thinking", "service_tier"})
KNOWN = PASSTHROUGH | {"model", "messages", "max_tokens", "stream"}

_TYPES = {v1.AUTH: "authentication_error", v1.INVALID: "invalid_request_error",
          v1.NOT_FOUND: "not_found_error", v1.TOO_LARGE: "request_too_large",
          v1.RATE_LIMITED: "rate_limit_error", v1.SATURATED: "rate_limit_error"}
_UPSTREAM_TYPES = {503: "overloaded_error", 504: "timeout_error"}


def error_body(problem: v1.ApiProblem) -> dict[str, Any]:
    kind = _TYPES.get(problem.kind) or _UPSTREAM_TYPES.get(problem.status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": problem.message}}


def render(problem: v1.ApiProblem) -> Response:
    return v1.render_problem(problem, error_body(problem))


def error_event(problem: v1.ApiProblem) -> str:
    return f"event: error\ndata: {json.dumps(error_body(problem))}\n\n"


def _api_key() -> str | None:
    key = request.headers.get("x-api-key", "").strip()
    return key or bearer_token(request.headers.get("Authorization"))


@bp.post("/v1/messages")
@limited_route
def messages() -> Response:
    try:
        return _serve()
    except Exception as exc:
        return render(v1.refusal(exc, lambda decision: anthropic_headers(decision, time.time())))


def _serve() -> Response:
    record = v1.authenticate(_api_key())
    body = v1.read_body()
    v1.unknown_fields(body, KNOWN)
    model = v1.model_field(body)
    messages = v1.messages_field(body)
    stream = v1.optional_bool(body, "stream")
    max_tokens = v1.optional_positive_int(body, "max_tokens")
    if max_tokens is None:
        raise v1.invalid("'max_tokens' is required.", "max_tokens")
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise v1.invalid("'system' must be a string or an array of text blocks.", "system")

    limiter = current_limiter()
    provider = _provider(model, limiter.policy)
    check_available(provider, model)
    priced = limiter.policy.model(model)
    terms = _terms(priced, body)
    params: dict[str, Any] = {k: v for k, v in body.items() if k in PASSTHROUGH and v is not None}
    params.update(model=model, messages=messages, max_tokens=max_tokens)
    estimate = v1.estimate(messages, system, body.get("tools"), model=priced)

    reservation = v1.reserve(record, model, estimate, max_tokens, terms=terms)
    reserved = estimate + max_tokens   # the tokens the guard saw this call take
    headers = v1.limit_headers(reservation, anthropic_headers, time.time())
    if not stream:
        if provider == "echo":
            reply = echo_llm.reply(messages, max_tokens, system)

            def call() -> llm_calls.UpstreamReply:
                return echo_llm.anthropic_message(model, reply)
        else:
            def call() -> llm_calls.UpstreamReply:
                return llm_calls.anthropic_create(params, v1.observer(model), reserved)

        answer = v1.run_plain(reservation, call, llm_calls.anthropic_usage,
                              renew=provider != "echo")
        return v1.json_reply(answer, headers)

    def open_call() -> UpstreamStream:
        if provider == "echo":
            return echo_llm.anthropic_stream(model, echo_llm.reply(messages, max_tokens, system))
        return llm_calls.anthropic_stream(params, v1.observer(model), reserved)

    upstream = v1.open_stream(reservation, open_call, renew=provider != "echo")
    tally = llm_calls.Tally()
    return v1.sse_response(_relay(upstream, tally), tally, reservation, upstream.close,
                           error_event, headers)


def _provider(model: str, policy: Policy) -> str:
    try:
        return provider_for(model, policy)
    except UnknownModel:
        raise v1.ApiProblem(404, v1.NOT_FOUND, f"model: {model}",
                            code="model_not_found") from None


def _terms(model: ModelPolicy | None, body: Mapping[str, Any]) -> PriceTerms:
    """What prices this call beyond its tokens: service_tier, cache writes (cache_control
    anywhere in the request) and server tools (each use billed, so each must be bounded)."""
    try:
        return PriceTerms(tier=tier_multiplier(model, body.get("service_tier")),
                          cache_writes=has_cache_control(body),
                          server_tool_uses=server_tool_uses(model, body.get("tools")))
    except PricingError as exc:
        raise v1.invalid(exc.message, exc.param) from None


def _relay(upstream: UpstreamStream, tally: llm_calls.Tally) -> Iterator[str]:
    """Named events one by one, reading usage from message_start and message_delta."""
    reported: dict[str, Any] = {}     # message_start's usage, updated by message_delta's
    for event in upstream.events:
        name = event.event or "message"
        payload = event.json()
        if name == "error":
            tally.failed = True
            yield f"event: error\ndata: {event.data}\n\n"
            return
        if name == "message_start":
            # The prompt's count; its output_tokens is only the start of the answer.
            usage = (payload.get("message") or {}).get("usage")
            if isinstance(usage, dict):
                reported.update(usage)
                tally.report(llm_calls.anthropic_usage({"usage": reported}), final=False)
        elif name == "message_delta":
            usage = payload.get("usage")
            if isinstance(usage, dict):   # the whole call's final count
                reported.update({k: v for k, v in usage.items() if v is not None})
                tally.report(llm_calls.anthropic_usage({"usage": reported}), final=True)
        if name == "message_stop":
            tally.complete = True
            yield f"event: {name}\ndata: {event.data}\n\n"
            return
        yield f"event: {name}\ndata: {event.data}\n\n"
    raise UpstreamError(502, "upstream_error", "The anthropic stream ended before it was complete.")
