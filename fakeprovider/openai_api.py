"""OpenAI Chat Completions (``POST /v1/chat/completions``) as the real API speaks it.

Auth is ``Authorization: Bearer <non-empty>``. Errors are
``{"error": {"message", "type", "param", "code"}}``. Rate-limit headers are
``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` with Go-style reset
durations ("12ms", "1s", "6m0s"). Streams are ``data: <chunk>\\n\\n`` events
ending in ``data: [DONE]``; with ``stream_options.include_usage`` every chunk
carries ``"usage": null`` and a last chunk with ``choices: []`` carries usage.
Token counting: see :mod:`fakeprovider.tokens`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from . import dialect
from .meter import Generation
from .ratelimit import Refusal, Snapshot, format_duration
from .server import Exchange, Headers
from .state import Billing
from .tokens import Completion, count_words, plan_reply

FINGERPRINT = "fp_fakeprovider"

_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", "unknown_url", "Not found."),
    405: ("invalid_request_error", None, "Method not allowed."),
    409: ("invalid_request_error", None, "Conflict."),
    413: ("invalid_request_error", None, "Request too large."),
    422: ("invalid_request_error", None, "Unprocessable entity."),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests. Please try again later.",
    ),
}
_SERVER_ERROR = (
    "server_error",
    None,
    "The server had an error while processing your request. Sorry about that!",
)


class OpenAIDialect(dialect.Dialect):
    """The OpenAI Chat Completions protocol."""

    name = "openai"

    def error_body(
        self, status: int, message: str | None, request_id: str, param: str | None = None
    ) -> Any:
        kind, code, stock = _ERRORS.get(status, _SERVER_ERROR if status >= 500 else _ERRORS[400])
        return {"error": {"message": message or stock, "type": kind, "param": param, "code": code}}

    def api_key(self, headers: dict[str, str]) -> str:
        return dialect.bearer_token(headers)

    def unauthorized_message(self) -> str:
        return (
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )

    def plan(self, body: Any, cached: tuple[int, int], billing: Billing) -> Completion:
        if not isinstance(body, dict):
            raise dialect.BadRequest(
                "We could not parse the JSON body of your request: expected a JSON object."
            )
        model = dialect.require_model(body)
        messages = dialect.require_messages(body)
        stream = dialect.optional_bool(body, "stream")
        limit = dialect.optional_positive_int(body, "max_completion_tokens")
        if limit is None:
            limit = dialect.optional_positive_int(body, "max_tokens")
        options = body.get("stream_options")
        if options is not None:
            if not stream:
                raise dialect.BadRequest(
                    "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                    "stream_options",
                )
            if not isinstance(options, dict):
                raise dialect.BadRequest("Invalid 'stream_options': expected an object.",
                                         "stream_options")
        include_usage = bool(options and options.get("include_usage") is True)
        return plan_reply(
            model=model,
            messages=messages,
            max_tokens=limit,
            stream=stream,
            include_usage=include_usage,
            cached=(cached[0], 0),
            prompt=dialect.billed_prompt(body, billing),
            tier=dialect.served_tier(body, billing, "default", {}),
        )

    def quota_headers(self, snap: Snapshot) -> Headers:
        return [
            ("x-ratelimit-limit-requests", str(snap.limit_requests)),
            ("x-ratelimit-limit-tokens", str(snap.limit_tokens)),
            ("x-ratelimit-remaining-requests", str(snap.remaining_requests)),
            ("x-ratelimit-remaining-tokens", str(snap.remaining_tokens)),
            ("x-ratelimit-reset-requests", format_duration(snap.reset_requests)),
            ("x-ratelimit-reset-tokens", format_duration(snap.reset_tokens)),
        ]

    def refusal_body(self, refusal: Refusal, request_id: str) -> Any:
        unit = "requests per min (RPM)" if refusal.kind == "requests" else "tokens per min (TPM)"
        message = (
            f"Rate limit reached for fake-model in organization org-fakeprovider on {unit}: "
            f"Limit {refusal.limit}, Used {refusal.used}, Requested {refusal.requested}. "
            f"Please try again in {format_duration(refusal.retry_after)}."
        )
        return {
            "error": {
                "message": message,
                "type": refusal.kind,
                "param": None,
                "code": "rate_limit_exceeded",
            }
        }

    async def respond(self, ex: Exchange, completion: Completion, headers: Headers,
                      chunk_delay: float, disconnect: bool, bill: Generation) -> None:
        cid = dialect.random_id("chatcmpl-", 29)
        created = int(time.time())
        finish = "length" if completion.truncated else "stop"
        if not completion.stream:
            bill.output(completion.completion_tokens)
            await ex.send_json(200, headers, _completion_object(cid, created, completion, finish))
            return
        await ex.start_stream(200, headers)

        # Every chunk, the usage chunk too, opens with the same fields.
        head: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": completion.model,
            "service_tier": completion.service_tier or "default",
            "system_fingerprint": FINGERPRINT,
        }

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            payload: dict[str, Any] = {
                **head,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                ],
            }
            if completion.include_usage:
                payload["usage"] = None
            return f"data: {dialect.dumps(payload)}\n\n".encode()

        await ex.send_chunk(chunk({"role": "assistant", "content": "", "refusal": None}))
        for i, piece in enumerate(completion.pieces()):
            if i and chunk_delay:
                await asyncio.sleep(chunk_delay)
            bill.output(count_words(piece))
            await ex.send_chunk(chunk({"content": piece}))
            if disconnect:
                await ex.abort()
                return
        await ex.send_chunk(chunk({}, finish))
        if completion.include_usage:
            last = {**head, "choices": [], "usage": _usage(completion)}
            await ex.send_chunk(f"data: {dialect.dumps(last)}\n\n".encode())
        await ex.send_chunk(b"data: [DONE]\n\n")
        await ex.end_stream()


def _usage(completion: Completion) -> dict[str, Any]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": completion.cache_read, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _completion_object(
    cid: str, created: int, completion: Completion, finish: str
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": completion.model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": completion.text,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": _usage(completion),
        "service_tier": completion.service_tier or "default",
        "system_fingerprint": FINGERPRINT,
    }
