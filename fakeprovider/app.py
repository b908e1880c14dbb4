"""Routing and the provider-agnostic request pipeline.

Order per request, mirroring what a real provider does cheaply first:
log → route (404) → method (405) → injected failure → auth (401) → JSON and
schema (400) → own rate limits (429, charging only admitted requests) →
meter the prompt → ``delay`` → reply (streams: ``chunk_delay`` between words),
metering output as it is generated. Errors are answered at once and billed
nothing; only admitted requests wait the delay. Every response carries the
request-id and rate-limit headers.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from .anthropic_api import AnthropicDialect
from .dialect import BadRequest, Dialect, new_request_id
from .openai_api import OpenAIDialect
from .ratelimit import retry_after_headers
from .server import Exchange, Headers, Request
from .state import Failure, RecordedRequest, State

OPENAI = OpenAIDialect()
ANTHROPIC = AnthropicDialect()

ROUTES: dict[str, Dialect] = {
    "/v1/chat/completions": OPENAI,
    "/chat/completions": OPENAI,
    "/v1/messages": ANTHROPIC,
    "/messages": ANTHROPIC,
}


def parse_json(raw: bytes) -> Any:
    """The parsed body, or None when it is empty or not valid JSON."""
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def guess_dialect(headers: dict[str, str]) -> Dialect:
    """For unknown paths: answer in Anthropic's shape if the client looks like an Anthropic one."""
    return ANTHROPIC if "x-api-key" in headers or "anthropic-version" in headers else OPENAI


def failure_headers(failure: Failure) -> Headers:
    """retry-after / retry-after-ms exactly as the test asked for them."""
    out: Headers = []
    if failure.retry_after is not None:
        value = failure.retry_after
        out.append(("retry-after", str(int(value)) if float(value).is_integer() else str(value)))
    if failure.retry_after_ms is not None:
        out.append(("retry-after-ms", str(failure.retry_after_ms)))
    return out


class App:
    """The request handler given to :class:`fakeprovider.server.HTTPServer`."""

    def __init__(self, state: State) -> None:
        self.state = state

    async def __call__(self, req: Request, ex: Exchange) -> None:
        with self.state.meter.busy():
            await self._handle(req, ex)

    async def _handle(self, req: Request, ex: Exchange) -> None:
        body = parse_json(req.body)
        self.state.record(
            RecordedRequest(req.method, req.path, req.query, req.headers, body, req.body)
        )
        rid = new_request_id()
        path = req.path.rstrip("/") or "/"
        dialect = ROUTES.get(path)
        if dialect is None:
            d = guess_dialect(req.headers)
            message = f"Unknown request URL: {req.method} {req.path}."
            await ex.send_json(404, self._headers(d, rid), d.error_body(404, message, rid))
            return
        if req.method != "POST":
            message = f"Method {req.method} not allowed on {req.path}; use POST."
            await ex.send_json(
                405, self._headers(dialect, rid), dialect.error_body(405, message, rid)
            )
            return
        failure = self.state.take_failure()
        if failure is not None:
            headers = self._headers(dialect, rid) + failure_headers(failure)
            await ex.send_json(
                failure.status, headers, dialect.error_body(failure.status, None, rid)
            )
            return
        if not dialect.authorized(req.headers):
            body401 = dialect.error_body(401, dialect.unauthorized_message(), rid)
            await ex.send_json(401, self._headers(dialect, rid), body401)
            return
        try:
            if body is None:
                raise BadRequest(
                    "We could not parse the JSON body of your request: expected a JSON object."
                )
            completion = dialect.plan(body, self.state.cached(), self.state.billing)
        except BadRequest as exc:
            body400 = dialect.error_body(400, exc.message, rid, exc.param)
            await ex.send_json(400, self._headers(dialect, rid), body400)
            return
        refusal, snap = self.state.admit(completion.prompt_tokens, completion.completion_tokens)
        headers = dialect.id_headers(rid) + dialect.quota_headers(snap)
        if refusal is not None:
            headers += retry_after_headers(refusal.retry_after)
            await ex.send_json(429, headers, dialect.refusal_body(refusal, rid))
            return
        fresh = completion.prompt_tokens - completion.cache_read - completion.cache_creation
        bill = self.state.meter.open(
            completion.model,
            dialect.api_key(req.headers),
            fresh,
            completion.cache_read,
            completion.cache_creation,
            completion.tier_price,
        )
        delay, chunk_delay = self.state.timings()
        if delay:
            await asyncio.sleep(delay)
        if ex.peer_gone():
            # The client gave up while the reply was being made (its timeout): a provider
            # finishes the work and bills it all, though nobody reads it.
            bill.output(completion.completion_tokens)
            return
        disconnect = completion.stream and self.state.take_disconnect()
        await dialect.respond(ex, completion, headers, chunk_delay, disconnect, bill)

    def _headers(self, dialect: Dialect, rid: str) -> Headers:
        return dialect.id_headers(rid) + dialect.quota_headers(self.state.snapshot())
