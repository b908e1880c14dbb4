"""POST /v1/chat/completions — OpenAI-compatible, plain and streamed, behind every layer.

Flow: key (``Authorization: Bearer``) → body checks → one reservation of the user's layers and
the model's upstream guard (input estimate + max output) → upstream (or ``echo``) → settle the
usage the provider reported. Without max_tokens/max_completion_tokens the plan's
default_max_tokens is reserved and sent upstream as max_completion_tokens, so the answer
can never outgrow what was reserved.

Errors, all in OpenAI's ``{"error": {"message", "type", "param", "code"}}`` shape:
  401 invalid_request_error/invalid_api_key · 400 invalid_request_error/invalid_request
  (param names the field; unknown fields are refused, as OpenAI does) · 404 model_not_found ·
  413 request_too_large · 429 type "requests" (edge, user, quota-*, concurrent) or "tokens"
  (token layers, usd-day) with code rate_limit_exceeded and Retry-After ·
  429 type "server_error", code "upstream_saturated" + Retry-After when the model's shared
  upstream guard refuses (the provider is at its limit, not the caller: server_error is
  OpenAI's "not your fault" type, and 429 + Retry-After lets SDKs back off) ·
  503 server_error/limiter_unavailable · 502/503/504 server_error with the upstream code
  (upstream_error, upstream_rate_limited, upstream_overloaded, upstream_timeout, ...).
After the first streamed byte an error is one ``data: {"error": ...}`` event that ends the
stream. What is charged follows the reservation rule (limiting.reservation): the provider's
reported usage, or everything reserved when no final report came.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from flask import Blueprint, Response, request

from limiting import (
    ModelPolicy,
    Policy,
    PriceTerms,
    PricingError,
    bearer_token,
    current_limiter,
    estimate_tokens,
    limited_route,
    openai_error_type,
    openai_headers,
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

bp = Blueprint("openai_api", __name__)

PASSTHROUGH = frozenset({
    "temperature", "top_p", "stop", "user", "tools", "tool_choice", "response_format", "seed",
    "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs",
    "parallel_tool_calls", "reasoning_effort", "metadata", "store", "service_tier",
    "functions", "function_call", "prediction", "verbosity", "safety_identifier",
    "prompt_cache_key",
})
KNOWN = PASSTHROUGH | {"model", "messages", "stream", "stream_options", "max_tokens",
                       "max_completion_tokens", "n"}

_TYPES = {v1.AUTH: "invalid_request_error", v1.INVALID: "invalid_request_error",
          v1.NOT_FOUND: "invalid_request_error", v1.TOO_LARGE: "invalid_request_error"}


def error_body(problem: v1.ApiProblem) -> dict[str, Any]:
    if problem.kind == v1.RATE_LIMITED:
        kind = openai_error_type(problem.unit)
    else:
        kind = _TYPES.get(problem.kind, "server_error")
    return {"error": {"message": problem.message, "type": kind, "param": problem.param,
                      "code": problem.code}}


def render(problem: v1.ApiProblem) -> Response:
    return v1.render_problem(problem, error_body(problem))


def error_event(problem: v1.ApiProblem) -> str:
    return f"data: {json.dumps(error_body(problem))}\n\n"


@bp.post("/v1/chat/completions")
@limited_route
def chat_completions() -> Response:
    try:
        return _serve()
    except Exception as exc:
        return render(v1.refusal(exc, openai_headers))


def _serve() -> Response:
    record = v1.authenticate(bearer_token(request.headers.get("Authorization")))
    body = v1.read_body()
    v1.unknown_fields(body, KNOWN)
    model = v1.model_field(body)
    messages = v1.messages_field(body, null_content_ok=True)
    stream = v1.optional_bool(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise v1.invalid("'stream_options' must be an object.", "stream_options")
        if not stream:
            raise v1.invalid("'stream_options' is only allowed when 'stream' is true.",
                             "stream_options")
    if body.get("n") not in (None, 1):
        raise v1.invalid("Only n=1 is supported.", "n")
    limit_given = {name: v1.optional_positive_int(body, name)
                   for name in ("max_completion_tokens", "max_tokens")}

    limiter = current_limiter()
    provider = _provider(model, limiter.policy)
    check_available(provider, model)
    priced = limiter.policy.model(model)
    terms = _terms(priced, body)
    # Both limits given: the provider may honour either, so the larger is reserved.
    max_output = max((v for v in limit_given.values() if v is not None), default=None)
    params: dict[str, Any] = {k: v for k, v in body.items() if k in PASSTHROUGH and v is not None}
    params.update(model=model, messages=messages)
    params.update({k: v for k, v in limit_given.items() if v is not None})
    if max_output is None:
        max_output = v1.plan_of(record).default_max_tokens
        params["max_completion_tokens"] = max_output
    estimate = v1.estimate(messages, tools=body.get("tools"), functions=body.get("functions"),
                           response_format=body.get("response_format"), model=priced)
    # Rejected predicted tokens are billed as output, beyond max_completion_tokens.
    prediction = body.get("prediction")
    predicted = estimate_tokens(json.dumps(prediction, default=str)) if prediction else 0

    reservation = v1.reserve(record, model, estimate, max_output + predicted, terms=terms)
    reserved = estimate + max_output + predicted   # the tokens the guard saw this call take
    headers = v1.limit_headers(reservation, openai_headers)
    if not stream:
        if provider == "echo":
            reply = echo_llm.reply(messages, max_output)

            def call() -> llm_calls.UpstreamReply:
                return echo_llm.openai_completion(model, reply)
        else:
            def call() -> llm_calls.UpstreamReply:
                return llm_calls.openai_create(params, v1.observer(model), reserved)

        answer = v1.run_plain(reservation, call, llm_calls.openai_usage,
                              renew=provider != "echo")
        return v1.json_reply(answer, headers)

    client_usage = bool(options and options.get("include_usage") is True)

    def open_call() -> UpstreamStream:
        if provider == "echo":
            return echo_llm.openai_stream(model, echo_llm.reply(messages, max_output))
        upstream = {**params, "stream_options": {**(options or {}), "include_usage": True}}
        return llm_calls.openai_stream(upstream, v1.observer(model), reserved)

    upstream = v1.open_stream(reservation, open_call, renew=provider != "echo")
    tally = llm_calls.Tally()
    return v1.sse_response(_relay(upstream, tally, client_usage), tally, reservation,
                           upstream.close, error_event, headers)


def _provider(model: str, policy: Policy) -> str:
    try:
        return provider_for(model, policy)
    except UnknownModel:
        raise v1.ApiProblem(404, v1.NOT_FOUND, f"The model `{model}` does not exist or you do "
                            "not have access to it.", code="model_not_found") from None


def _terms(model: ModelPolicy | None, body: Mapping[str, Any]) -> PriceTerms:
    """What prices this call beyond its tokens: OpenAI's service_tier."""
    try:
        return PriceTerms(tier=tier_multiplier(model, body.get("service_tier")))
    except PricingError as exc:
        raise v1.invalid(exc.message, exc.param) from None


def _relay(upstream: UpstreamStream, tally: llm_calls.Tally, client_usage: bool) -> Iterator[str]:
    """Chunks event by event; the usage-only chunk (always requested upstream, so we can
    settle) reaches the client only if it asked for include_usage."""
    for event in upstream.events:
        if event.data.strip() == "[DONE]":
            tally.complete = True
            yield "data: [DONE]\n\n"
            return
        chunk = event.json()
        if not isinstance(chunk, dict):
            continue
        if chunk.get("error"):
            tally.failed = True
            yield f"data: {event.data}\n\n"
            return
        data = event.data
        usage = llm_calls.openai_usage(chunk)
        tally.report(usage, final=True)     # OpenAI reports usage once, for the whole call
        if not client_usage and "usage" in chunk:
            if usage is not None and not chunk.get("choices"):
                continue
            del chunk["usage"]
            data = json.dumps(chunk, separators=(",", ":"))
        yield f"data: {data}\n\n"
    raise UpstreamError(502, "upstream_error", "The openai stream ended before it was complete.")
