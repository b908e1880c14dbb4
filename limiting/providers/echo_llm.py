"""The ``echo`` model in both wire protocols, so /v1 works with no provider account.

Usage is counted by the rule of :mod:`fakeprovider.tokens` (a token is a whitespace-separated
word; prompt = words of each message + 4, plus the system prompt's words), so tests can
predict exactly what the token layers settle. The reply is ``"echo: "`` + the last user
message's text, cut to ``max_tokens`` words. Answers come back as the same
:class:`UpstreamReply` / :class:`UpstreamStream` a real provider call gives, so the
blueprints handle echo and upstream with one code path.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .llm_calls import SSEEvent, UpstreamReply, UpstreamStream

PER_MESSAGE_OVERHEAD = 4
PREFIX = "echo: "
HEADERS = {"content-type": "application/json"}


@dataclass(frozen=True, slots=True)
class EchoReply:
    words: tuple[str, ...]
    prompt_tokens: int
    truncated: bool

    @property
    def text(self) -> str:
        return " ".join(self.words)

    @property
    def completion_tokens(self) -> int:
        return len(self.words)

    def pieces(self) -> list[str]:
        """One stream delta per word; they concatenate to ``text``."""
        return [w if i == 0 else " " + w for i, w in enumerate(self.words)]


def text_of(content: Any) -> str:
    """A message content's text: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for part in content:
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, Mapping):
                if isinstance(part.get("text"), str):
                    pieces.append(part["text"])
                elif part.get("type") == "tool_result":
                    pieces.append(text_of(part.get("content")))
        return " ".join(p for p in pieces if p)
    return ""


def reply(messages: Sequence[Mapping[str, Any]], max_tokens: int | None,
          system: Any = None) -> EchoReply:
    last = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    words = (PREFIX + (text_of(last.get("content")) if last else "")).split()
    truncated = max_tokens is not None and len(words) > max_tokens
    if max_tokens is not None:
        words = words[:max_tokens]
    prompt = sum(len(text_of(m.get("content")).split()) + PER_MESSAGE_OVERHEAD for m in messages)
    if system is not None:
        prompt += len(text_of(system).split())
    return EchoReply(tuple(words), prompt, truncated)


def _dumps(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"))


def _id(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(18).replace("-", "a").replace("_", "b")


# --- OpenAI Chat Completions ----------------------------------------------------------------------


def _openai_usage(r: EchoReply) -> dict[str, Any]:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0}}


def openai_completion(model: str, r: EchoReply) -> UpstreamReply:
    body = {
        "id": _id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text,
                                             "refusal": None},
                     "logprobs": None, "finish_reason": "length" if r.truncated else "stop"}],
        "usage": _openai_usage(r),
    }
    return UpstreamReply(_dumps(body).encode(), dict(HEADERS))


def openai_stream(model: str, r: EchoReply) -> UpstreamStream:
    """Chunks as OpenAI sends them with ``include_usage``; the relay drops what wasn't asked."""
    cid, created = _id("chatcmpl-"), int(time.time())

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> SSEEvent:
        return SSEEvent(None, _dumps({"id": cid, "object": "chat.completion.chunk",
                                      "created": created, "model": model, "choices": choices,
                                      "usage": usage}))

    def events() -> Iterator[SSEEvent]:
        yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None}])
        for piece in r.pieces():
            yield chunk([{"index": 0, "delta": {"content": piece}, "logprobs": None,
                          "finish_reason": None}])
        yield chunk([{"index": 0, "delta": {}, "logprobs": None,
                      "finish_reason": "length" if r.truncated else "stop"}])
        yield chunk([], _openai_usage(r))
        yield SSEEvent(None, "[DONE]")

    return UpstreamStream({"content-type": "text/event-stream"}, events())


# --- Anthropic Messages ---------------------------------------------------------------------------


def _anthropic_usage(r: EchoReply, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": r.prompt_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0, "output_tokens": output_tokens}


def _message(mid: str, model: str, r: EchoReply, content: list[Any], stop: str | None,
             output_tokens: int) -> dict[str, Any]:
    return {"id": mid, "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": _anthropic_usage(r, output_tokens)}


def _stop_reason(r: EchoReply) -> str:
    return "max_tokens" if r.truncated else "end_turn"


def anthropic_message(model: str, r: EchoReply) -> UpstreamReply:
    body = _message(_id("msg_"), model, r, [{"type": "text", "text": r.text}], _stop_reason(r),
                    r.completion_tokens)
    return UpstreamReply(_dumps(body).encode(), dict(HEADERS))


def anthropic_stream(model: str, r: EchoReply) -> UpstreamStream:
    """The named event sequence of a Messages stream, one text_delta per word."""
    mid = _id("msg_")

    def event(name: str, payload: dict[str, Any]) -> SSEEvent:
        return SSEEvent(name, _dumps({"type": name, **payload}))

    def events() -> Iterator[SSEEvent]:
        yield event("message_start", {"message": _message(mid, model, r, [], None, 0)})
        yield event("content_block_start",
                    {"index": 0, "content_block": {"type": "text", "text": ""}})
        yield event("ping", {})
        for piece in r.pieces():
            yield event("content_block_delta",
                        {"index": 0, "delta": {"type": "text_delta", "text": piece}})
        yield event("content_block_stop", {"index": 0})
        yield event("message_delta",
                    {"delta": {"stop_reason": _stop_reason(r), "stop_sequence": None},
                     "usage": _anthropic_usage(r, r.completion_tokens)})
        yield event("message_stop", {})

    return UpstreamStream({"content-type": "text/event-stream"}, events())
