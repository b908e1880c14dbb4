"""The one upstream call: the provider's own JSON body, SSE events and response headers.

/v1 and /chat both call through here (by way of :mod:`providers.apis`). /v1 relays what
the provider said rather than a re-serialised SDK model, so clients see the exact fields; every
response's headers are kept too (the limiter learns the provider's pacing from them). Each call
reports ``observe(headers, status, tokens)`` once, on success and on an HTTP error alike, then
raises :class:`UpstreamError` for any failure. The usage readers turn each provider's usage
object into the limiter's :class:`Usage`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from limiting.core.llm import Usage

if TYPE_CHECKING:
    from limiting.reservation import Reservation

from .clients import anthropic_client, openai_client
from .errors import Observe as Observe  # (headers, status, tokens): the guard's view
from .errors import UpstreamError, from_sdk, guarded_call


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One server-sent event: its ``event:`` name (None when absent) and its data text."""

    event: str | None
    data: str

    def json(self) -> Any:
        """The data as JSON; garbage from upstream is the upstream's failure."""
        try:
            return json.loads(self.data)
        except ValueError:
            raise UpstreamError(502, "upstream_error",
                                "The upstream sent an unreadable stream event.") from None


@dataclass(slots=True)
class UpstreamReply:
    """A whole (non-streamed) answer: the body bytes as the provider sent them."""

    body: bytes
    headers: dict[str, str]
    status: int = 200

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(slots=True)
class UpstreamStream:
    """An open stream: headers are known, events arrive as they are iterated."""

    headers: dict[str, str]
    events: Iterator[SSEEvent]
    close: Callable[[], None] = field(default=lambda: None)
    status: int = 200


@dataclass(slots=True)
class Tally:
    """What a stream will be charged. Only the provider's final usage report (OpenAI's usage
    chunk, Anthropic's message_delta) says what it billed; a stream that ends without one
    (cut by the client, broken upstream, no report) is charged as reserved, with the input the
    provider reported if it did (message_start). Visible deltas are no measure: reasoning
    tokens and multi-token deltas bill unseen."""

    reported: Usage | None = None   # the provider's latest usage, as its usage reader built it
    final: bool = False             # ``reported`` is the final report of the whole call
    failed: bool = False            # set before relaying the upstream's error event
    complete: bool = False          # set before relaying the final event

    def report(self, usage: Usage | None, *, final: bool) -> None:
        if usage is not None:
            self.reported = usage
            self.final = self.final or final

    def charge(self, reservation: Reservation) -> None:
        """Finish ``reservation`` by what the stream told: its final report, else as
        reserved."""
        if self.final and self.reported is not None:
            reservation.settle(self.reported)
        else:
            reservation.charge_reserved(
                self.reported.input_tokens if self.reported is not None else None)


def as_int(value: Any) -> int:
    """A provider's count, or 0: a negative or non-integer count must never refund anything."""
    return max(0, value) if isinstance(value, int) and not isinstance(value, bool) else 0


def openai_usage(data: Any) -> Usage | None:
    """Usage of a completion or chunk: prompt_tokens includes the cached part."""
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = as_int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    tier = data.get("service_tier")   # top level, in every chunk of a stream too
    return Usage(as_int(usage.get("prompt_tokens")), as_int(usage.get("completion_tokens")),
                 cached, service_tier=tier if isinstance(tier, str) else None)


def _cache_writes(usage: Mapping[str, Any]) -> tuple[int, int]:
    """(5-minute, 1-hour) cache writes. Without the ``cache_creation`` breakdown every write
    is a 5-minute one; with it, any part of the total it does not explain is too."""
    total = as_int(usage.get("cache_creation_input_tokens"))
    split = usage.get("cache_creation")
    if not isinstance(split, Mapping):
        return total, 0
    hour = as_int(split.get("ephemeral_1h_input_tokens"))
    return max(as_int(split.get("ephemeral_5m_input_tokens")), total - hour), hour


def anthropic_prompt(usage: Mapping[str, Any]) -> tuple[int, int]:
    """(whole prompt, cache reads): Anthropic's input_tokens is only the uncached part."""
    read = as_int(usage.get("cache_read_input_tokens"))
    return as_int(usage.get("input_tokens")) + read + sum(_cache_writes(usage)), read


def anthropic_usage(data: Any) -> Usage | None:
    """A message's usage, cache writes and web searches apart, as each has its own price
    (web fetches bill only the tokens they bring in)."""
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return None
    total, read = anthropic_prompt(usage)
    writes, writes_1h = _cache_writes(usage)
    tools = usage.get("server_tool_use")
    uses = as_int(tools.get("web_search_requests")) if isinstance(tools, Mapping) else 0
    tier = usage.get("service_tier")
    return Usage(total, as_int(usage.get("output_tokens")), read, cache_write_tokens=writes,
                 cache_write_1h_tokens=writes_1h, server_tool_uses=uses,
                 service_tier=tier if isinstance(tier, str) else None)


def parse_sse(lines: Iterable[str]) -> Iterator[SSEEvent]:
    """Events from SSE lines (WHATWG rules: data lines joined by "\\n", comments skipped)."""
    name: str | None = None
    data: list[str] = []
    for line in lines:
        line = line.rstrip("\r")
        if not line:
            if data:
                yield SSEEvent(name, "\n".join(data))
            name, data = None, []
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "event":
            name = value
        elif key == "data":
            data.append(value)
    if data:
        yield SSEEvent(name, "\n".join(data))


def _guarded(events: Iterator[SSEEvent], provider: str) -> Iterator[SSEEvent]:
    """Any failure while reading the stream leaves as UpstreamError."""
    try:
        yield from events
    except GeneratorExit:
        raise
    except Exception as exc:
        raise from_sdk(exc, provider) from None


def _endpoint(provider: str) -> Any:
    """The SDK resource whose ``create`` is the provider's chat call."""
    if provider == "anthropic":
        return anthropic_client().messages
    return openai_client().chat.completions


def create(provider: str, params: Mapping[str, Any], observe: Observe, tokens: int
           ) -> UpstreamReply:
    """One whole answer (POST /v1/chat/completions or /v1/messages upstream, not streamed)."""

    def send() -> tuple[Any, bytes]:
        raw = _endpoint(provider).with_raw_response.create(**params)
        return raw, raw.http_response.read()

    raw, body = guarded_call(provider, observe, tokens, send)
    headers = dict(raw.headers)
    observe(headers, raw.status_code, tokens)
    return UpstreamReply(body, headers, raw.status_code)


def stream(provider: str, params: Mapping[str, Any], observe: Observe, tokens: int
           ) -> UpstreamStream:
    """The same call with ``stream: true``; returns once the headers arrive."""
    raw = guarded_call(provider, observe, tokens,
                       lambda: _endpoint(provider).with_raw_response.create(**params, stream=True))
    response = raw.http_response
    headers = dict(response.headers)
    observe(headers, response.status_code, tokens)
    return UpstreamStream(headers, _guarded(parse_sse(response.iter_lines()), provider),
                          response.close, response.status_code)
