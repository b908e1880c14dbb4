"""POST /v1/messages — Anthropic-compatible, plain and streamed, behind every layer.

Key: ``x-api-key`` or ``Authorization: Bearer`` (the anthropic 2.x SDK sends Bearer).
``max_tokens`` is required, as upstream. Settled to what the provider reported: input =
input_tokens + cache_read_input_tokens + cache_creation_input_tokens (the whole prompt),
cached = cache_read_input_tokens.

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
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from werkzeug.datastructures import Headers

from limiting.core.decision import Decision
from limiting.core.pricing import PriceTerms, has_cache_control, server_tool_uses, tier_multiplier
from limiting.core.provider_headers import anthropic_headers
from limiting.keys import bearer_token
from limiting.providers import ANTHROPIC, LLMRequest, UpstreamError
from limiting.providers.llm_calls import Tally, UpstreamStream, anthropic_usage

from . import fields
from .dialect import Dialect
from .problems import (
    AUTH,
    INVALID,
    NOT_FOUND,
    RATE_LIMITED,
    SATURATED,
    TOO_LARGE,
    ApiProblem,
    invalid,
)

PASSTHROUGH = frozenset({"system", "temperature", "top_p", "top_k", "stop_sequences",
                         "metadata", "tools", "tool_choice", "thinking", "service_tier"})
KNOWN = PASSTHROUGH | {"model", "messages", "max_tokens", "stream"}

_TYPES = {AUTH: "authentication_error", INVALID: "invalid_request_error",
          NOT_FOUND: "not_found_error", TOO_LARGE: "request_too_large",
          RATE_LIMITED: "rate_limit_error", SATURATED: "rate_limit_error"}
_UPSTREAM_TYPES = {503: "overloaded_error", 504: "timeout_error"}


class AnthropicDialect(Dialect):
    api = ANTHROPIC

    def api_key(self, headers: Headers) -> str | None:
        key = headers.get("x-api-key", "").strip()
        return key or bearer_token(headers.get("Authorization"))

    def parse(self, body: Mapping[str, Any], default_max: Callable[[], int]) -> LLMRequest:
        fields.unknown_fields(body, KNOWN)
        model = fields.model_field(body)
        messages = fields.messages_field(body)
        stream = fields.optional_bool(body, "stream")
        max_tokens = fields.optional_positive_int(body, "max_tokens")
        if max_tokens is None:
            raise invalid("'max_tokens' is required.", "max_tokens")
        system = body.get("system")
        if system is not None and not isinstance(system, (str, list)):
            raise invalid("'system' must be a string or an array of text blocks.", "system")

        provider, priced = fields.provider_of(model, f"model: {model}",
                                             serves=self.api.name)
        # Beyond tokens: service_tier, cache writes (cache_control anywhere in the request)
        # and server tools (each use billed, so each must be bounded).
        terms = fields.price_terms(lambda: PriceTerms(
            tier=tier_multiplier(priced, body.get("service_tier")),
            cache_writes=has_cache_control(body),
            server_tool_uses=server_tool_uses(priced, body.get("tools"))))
        params = fields.passthrough(body, PASSTHROUGH)
        params.update(model=model, messages=messages, max_tokens=max_tokens)
        estimate = fields.estimate(messages, system, body.get("tools"),
                                   tool_choice=body.get("tool_choice"), name=model, model=priced)
        return LLMRequest(model, provider, messages, max_tokens, estimate, params,
                          stream=stream, terms=terms, system=system)

    def end_user(self, body: Mapping[str, Any]) -> tuple[str, Any]:
        metadata = body.get("metadata")
        if metadata is None:
            return "metadata.user_id", None
        if not isinstance(metadata, dict):
            raise invalid("metadata: Input should be an object.", "metadata")
        return "metadata.user_id", metadata.get("user_id")

    def error_body(self, problem: ApiProblem) -> dict[str, Any]:
        kind = _TYPES.get(problem.kind) or _UPSTREAM_TYPES.get(problem.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": problem.message,
                                           **problem.extra()}}

    def error_event(self, problem: ApiProblem) -> str:
        return f"event: error\ndata: {json.dumps(self.error_body(problem))}\n\n"

    def provider_headers(self, decision: Decision) -> dict[str, str]:
        return anthropic_headers(decision, time.time())

    def relay(self, upstream: UpstreamStream, tally: Tally, call: LLMRequest) -> Iterator[str]:
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
                    tally.report(anthropic_usage({"usage": reported}), final=False)
            elif name == "message_delta":
                usage = payload.get("usage")
                if isinstance(usage, dict):   # the whole call's final count
                    reported.update({k: v for k, v in usage.items() if v is not None})
                    tally.report(anthropic_usage({"usage": reported}), final=True)
            if name == "message_stop":
                tally.complete = True   # settled before the last event goes out
                yield f"event: {name}\ndata: {event.data}\n\n"
                return
            yield f"event: {name}\ndata: {event.data}\n\n"
        raise UpstreamError(502, "upstream_error",
                            "The anthropic stream ended before it was complete.")


ANTHROPIC_DIALECT = AnthropicDialect()
