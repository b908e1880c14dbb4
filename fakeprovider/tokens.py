"""Deterministic token counting and reply planning shared by both fake APIs.

The limiter estimates tokens *before* a call and reconciles with the provider's
reported usage afterwards, so the fake must count in a simple, documented way
that a limiter estimate can bound from above:

* a **token** is one whitespace-separated word (``str.split()``);
* **prompt tokens** = sum over messages of (words in the message's text + 4);
  Anthropic additionally adds the words of the ``system`` prompt (no +4);
* the **reply** is ``"echo: " + <text of the last user message>``, its words
  joined by single spaces, cut to ``max_tokens`` (or OpenAI's
  ``max_completion_tokens``) words when given; **completion tokens** = words
  in the reply.

Message text is a string or a list of parts; every part carrying a string
``text`` counts (``{"type": "text", "text": ...}``), and an Anthropic
``tool_result`` part's nested ``content`` counts the same way. Other parts
(images, tool calls) count zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PER_MESSAGE_OVERHEAD = 4
REPLY_PREFIX = "echo: "


def count_words(text: str) -> int:
    """Tokens in ``text``: its whitespace-separated words."""
    return len(text.split())


def content_text(content: Any) -> str:
    """Plain text of a message ``content`` (string or list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces: list[str] = []
        for part in content:
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    pieces.append(part["text"])
                elif part.get("type") == "tool_result":
                    pieces.append(content_text(part.get("content")))
        return " ".join(p for p in pieces if p)
    return ""


def prompt_tokens(messages: list[dict[str, Any]], system: Any = None) -> int:
    """Prompt tokens per the module rule (messages + 4 each, plus system words)."""
    total = sum(
        count_words(content_text(m.get("content"))) + PER_MESSAGE_OVERHEAD for m in messages
    )
    if system is not None:
        total += count_words(content_text(system))
    return total


def last_user_text(messages: list[dict[str, Any]]) -> str:
    """Text of the last ``role == "user"`` message, or "" when there is none."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


@dataclass(frozen=True)
class Completion:
    """Everything decided about one reply before any byte is sent."""

    model: str
    prompt_tokens: int
    words: list[str]
    truncated: bool
    stream: bool
    include_usage: bool = False
    cache_read: int = 0
    cache_creation: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    service_tier: str = ""        # the tier the reply reports ("" = the API's standard name)
    tier_price: float = 1.0       # what the meter multiplies this call's prices by

    @property
    def text(self) -> str:
        """The full reply, words joined by single spaces."""
        return " ".join(self.words)

    @property
    def completion_tokens(self) -> int:
        """Reply tokens (words)."""
        return len(self.words)

    def pieces(self) -> list[str]:
        """Stream deltas, one per word; they concatenate to ``text``."""
        return [w if i == 0 else " " + w for i, w in enumerate(self.words)]


def plan_reply(
    *,
    model: str,
    messages: list[dict[str, Any]],
    max_tokens: int | None,
    stream: bool,
    include_usage: bool = False,
    system: Any = None,
    cached: tuple[int, int] = (0, 0),
    prompt: int | None = None,
    tier: tuple[str, float] = ("", 1.0),
) -> Completion:
    """Build the deterministic reply for a validated request."""
    words = (REPLY_PREFIX + last_user_text(messages)).split()
    truncated = max_tokens is not None and len(words) > max_tokens
    if truncated:
        words = words[:max_tokens]
    if prompt is None:
        prompt = prompt_tokens(messages, system)
    read = max(0, min(cached[0], prompt))
    creation = max(0, min(cached[1], prompt - read))
    return Completion(
        model=model,
        prompt_tokens=prompt,
        words=words,
        truncated=truncated,
        stream=stream,
        include_usage=include_usage,
        cache_read=read,
        cache_creation=creation,
        service_tier=tier[0],
        tier_price=tier[1],
    )
