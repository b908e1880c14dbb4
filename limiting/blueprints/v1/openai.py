"""POST /v1/chat/completions — OpenAI-compatible, plain and streamed, behind every layer.

Key: ``Authorization: Bearer``. Without max_tokens/max_completion_tokens the plan's
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
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from werkzeug.datastructures import Headers

from limiting.core.decision import Decision
from limiting.core.llm import estimate_tokens
from limiting.core.pricing import PriceTerms, tier_multiplier
from limiting.core.provider_headers import openai_error_type, openai_headers
from limiting.keys import bearer_token
from limiting.providers import OPENAI, LLMRequest, UpstreamError
from limiting.providers.llm_calls import Tally, UpstreamStream, openai_usage

from . import fields
from .dialect import Dialect
from .problems import AUTH, INVALID, NOT_FOUND, RATE_LIMITED, TOO_LARGE, ApiProblem, invalid

PASSTHROUGH = frozenset({
    "temperature", "top_p", "stop", "user", "tools", "tool_choice", "response_format", "seed",
    "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs",
    "parallel_tool_calls", "reasoning_effort", "metadata", "store", "service_tier",
    "functions", "function_call", "prediction", "verbosity", "safety_identifier",
    "prompt_cache_key",
})
KNOWN = PASSTHROUGH | {"model", "messages", "stream", "stream_options", "max_tokens",
                       "max_completion_tokens", "n"}

_TYPES = {AUTH: "invalid_request_error", INVALID: "invalid_request_error",
          NOT_FOUND: "invalid_request_error", TOO_LARGE: "invalid_request_error"}


class OpenAIDialect(Dialect):
    api = OPENAI

    def api_key(self, headers: Headers) -> str | None:
        return bearer_token(headers.get("Authorization"))

    def parse(self, body: Mapping[str, Any], default_max: Callable[[], int]) -> LLMRequest:
        fields.unknown_fields(body, KNOWN)
        model = fields.model_field(body)
        messages = fields.messages_field(body, null_content_ok=True)
        stream = fields.optional_bool(body, "stream")
        options = body.get("stream_options")
        if options is not None:
            if not isinstance(options, dict):
                raise invalid("'stream_options' must be an object.", "stream_options")
            if not stream:
                raise invalid("'stream_options' is only allowed when 'stream' is true.",
                              "stream_options")
        if body.get("n") not in (None, 1):
            raise invalid("Only n=1 is supported.", "n")
        given = {name: fields.optional_positive_int(body, name)
                 for name in ("max_completion_tokens", "max_tokens")}

        provider, priced = fields.provider_of(
            model, f"The model `{model}` does not exist or you do not have access to it.",
            serves=self.api.name)
        terms = fields.price_terms(
            lambda: PriceTerms(tier=tier_multiplier(priced, body.get("service_tier"))))
        params = fields.passthrough(body, PASSTHROUGH)
        params.update(model=model, messages=messages)
        params.update({k: v for k, v in given.items() if v is not None})
        # Both limits given: the provider may honour either, so the larger is reserved.
        max_output = max((v for v in given.values() if v is not None), default=None)
        if max_output is None:
            max_output = params["max_completion_tokens"] = default_max()
        estimate = fields.estimate(messages, tools=body.get("tools"),
                                   functions=body.get("functions"),
                                   response_format=body.get("response_format"),
                                   tool_choice=[body.get("tool_choice"),
                                                body.get("function_call")],
                                   name=model, model=priced)
        # Rejected predicted tokens are billed as output, beyond max_completion_tokens.
        prediction = body.get("prediction")
        predicted = estimate_tokens(json.dumps(prediction, default=str), model) \
            if prediction else 0
        if stream:   # always asked upstream, so the stream can be settled
            params["stream_options"] = {**(options or {}), "include_usage": True}
        return LLMRequest(model, provider, messages, max_output, estimate, params,
                          stream=stream, terms=terms, extra_output=predicted,
                          show_usage=bool(options and options.get("include_usage") is True))

    def end_user(self, body: Mapping[str, Any]) -> tuple[str, Any]:
        """safety_identifier (OpenAI's newer name) when given, else user."""
        if body.get("safety_identifier") not in (None, ""):
            return "safety_identifier", body["safety_identifier"]
        return "user", body.get("user")

    def error_body(self, problem: ApiProblem) -> dict[str, Any]:
        if problem.kind == RATE_LIMITED:
            kind = openai_error_type(problem.unit)
        else:
            kind = _TYPES.get(problem.kind, "server_error")
        return {"error": {"message": problem.message, "type": kind, "param": problem.param,
                          "code": problem.code, **problem.extra()}}

    def error_event(self, problem: ApiProblem) -> str:
        return f"data: {json.dumps(self.error_body(problem))}\n\n"

    def provider_headers(self, decision: Decision) -> dict[str, str]:
        return openai_headers(decision)

    def relay(self, upstream: UpstreamStream, tally: Tally, call: LLMRequest) -> Iterator[str]:
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
            usage = openai_usage(chunk)
            tally.report(usage, final=True)   # OpenAI reports usage once, for the whole call
            if not call.show_usage and "usage" in chunk:
                if usage is not None and not chunk.get("choices"):
                    continue
                del chunk["usage"]
                data = json.dumps(chunk, separators=(",", ":"))
            yield f"data: {data}\n\n"
        raise UpstreamError(502, "upstream_error",
                            "The openai stream ended before it was complete.")


OPENAI_DIALECT = OpenAIDialect()
