"""Anthropic Messages (``POST /v1/messages``) as the real API speaks it.

Auth is a non-empty ``x-api-key`` or ``Authorization: Bearer`` (the installed
anthropic SDK 2.x sends its api_key as a Bearer token); ``anthropic-version`` is accepted but not
required. Errors are ``{"type": "error", "error": {"type", "message"},
"request_id"}``; 529 is ``overloaded_error``. Rate-limit headers are
``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}``
with RFC 3339 UTC resets. Streams are named SSE events: message_start, content_block_start,
ping, content_block_delta (one text_delta per word), content_block_stop, message_delta,
message_stop. Usage: ``input_tokens`` is the uncached part of the prompt, so
``input_tokens + cache_read_input_tokens + cache_creation_input_tokens`` equals the
prompt count of :mod:`fakeprovider.tokens` (which includes the system prompt).
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import dialect
from .meter import Generation
from .ratelimit import Refusal, Snapshot, rfc3339_after
from .server import Exchange, Headers
from .state import Billing
from .tokens import Completion, count_words, plan_reply

_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Billing error."),
    403: (
        "permission_error",
        "Your API key does not have permission to use the specified resource.",
    ),
    404: ("not_found_error", "Not found."),
    405: ("invalid_request_error", "Method not allowed."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timed out."),
    529: ("overloaded_error", "Overloaded"),
}


class AnthropicDialect(dialect.Dialect):
    """The Anthropic Messages protocol."""

    name = "anthropic"

    def error_body(
        self, status: int, message: str | None, request_id: str, param: str | None = None
    ) -> Any:
        default = _ERRORS[500] if status >= 500 else _ERRORS[400]
        kind, stock = _ERRORS.get(status, default)
        return {
            "type": "error",
            "error": {"type": kind, "message": message or stock},
            "request_id": request_id,
        }

    def api_key(self, headers: dict[str, str]) -> str:
        # anthropic SDK 2.x sends api_key as "Authorization: Bearer"; 0.x sent x-api-key.
        return headers.get("x-api-key", "").strip() or dialect.bearer_token(headers)

    def unauthorized_message(self) -> str:
        return "x-api-key header is required"

    def plan(self, body: Any, cached: tuple[int, int], billing: Billing) -> Completion:
        if not isinstance(body, dict):
            raise dialect.BadRequest("Request body must be a JSON object.")
        model = dialect.require_model(body)
        messages = dialect.require_messages(body)
        max_tokens = dialect.optional_positive_int(body, "max_tokens")
        if max_tokens is None:
            raise dialect.BadRequest("max_tokens: Field required", "max_tokens")
        system = body.get("system")
        if system is not None and not isinstance(system, (str, list)):
            raise dialect.BadRequest(
                "system: Input should be a valid string or list of text blocks", "system"
            )
        return plan_reply(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            stream=dialect.optional_bool(body, "stream"),
            system=system,
            cached=cached,
            prompt=dialect.billed_prompt(body, billing),
            tier=dialect.served_tier(body, billing, "standard", {"standard_only": "standard"}),
        )

    def quota_headers(self, snap: Snapshot) -> Headers:
        requests_reset = rfc3339_after(snap.reset_requests)
        tokens_reset = rfc3339_after(snap.reset_tokens)
        # Input and output tokens are limited by the tokens limit, each with its own remaining.
        rows = (
            ("requests", snap.limit_requests, snap.remaining_requests, requests_reset),
            ("tokens", snap.limit_tokens, snap.remaining_tokens, tokens_reset),
            ("input-tokens", snap.limit_tokens, snap.remaining_input_tokens, tokens_reset),
            ("output-tokens", snap.limit_tokens, snap.remaining_output_tokens, tokens_reset),
        )
        return [
            (f"anthropic-ratelimit-{name}-{field}", value)
            for name, limit, remaining, reset in rows
            for field, value in (("limit", str(limit)), ("remaining", str(remaining)),
                                 ("reset", reset))
        ]

    def refusal_body(self, refusal: Refusal, request_id: str) -> Any:
        unit = "requests per minute" if refusal.kind == "requests" else "tokens per minute"
        message = (
            "This request would exceed the rate limit for your organization of "
            f"{refusal.limit} {unit}. "
            "For details, refer to: https://docs.claude.com/en/api/rate-limits."
        )
        return self.error_body(429, message, request_id)

    async def respond(self, ex: Exchange, completion: Completion, headers: Headers,
                      chunk_delay: float, disconnect: bool, bill: Generation) -> None:
        mid = dialect.random_id("msg_01", 22)
        stop_reason = "max_tokens" if completion.truncated else "end_turn"
        usage = _usage(completion)
        if not completion.stream:
            bill.output(completion.completion_tokens)
            message = _message(
                mid, completion, [{"type": "text", "text": completion.text}], stop_reason, usage
            )
            await ex.send_json(200, headers, message)
            return
        await ex.start_stream(200, headers)

        async def event(name: str, payload: dict[str, Any]) -> None:
            await ex.send_chunk(f"event: {name}\ndata: {dialect.dumps(payload)}\n\n".encode())

        start_usage = dict(usage, output_tokens=1)
        await event(
            "message_start",
            {"type": "message_start", "message": _message(mid, completion, [], None, start_usage)},
        )
        block = {"type": "text", "text": ""}
        await event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": block},
        )
        await event("ping", {"type": "ping"})
        for i, piece in enumerate(completion.pieces()):
            if i and chunk_delay:
                await asyncio.sleep(chunk_delay)
            bill.output(count_words(piece))
            delta = {"type": "text_delta", "text": piece}
            await event(
                "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
            )
            if disconnect:
                await ex.abort()
                return
        await event("content_block_stop", {"type": "content_block_stop", "index": 0})
        final_usage = {
            k: usage[k]
            for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        }
        final_usage["output_tokens"] = usage["output_tokens"]
        await event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": final_usage,
            },
        )
        await event("message_stop", {"type": "message_stop"})
        await ex.end_stream()


def _usage(completion: Completion) -> dict[str, Any]:
    uncached = completion.prompt_tokens - completion.cache_read - completion.cache_creation
    return {
        "input_tokens": uncached,
        "cache_creation_input_tokens": completion.cache_creation,
        "cache_read_input_tokens": completion.cache_read,
        "output_tokens": completion.completion_tokens,
        "service_tier": completion.service_tier or "standard",
    }


def _message(
    mid: str,
    completion: Completion,
    content: list[Any],
    stop_reason: str | None,
    usage: dict[str, Any],
) -> dict[str, Any]:
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": completion.model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage,
    }
