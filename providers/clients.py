"""The official SDK clients, one per worker process, created after the fork."""

from __future__ import annotations

import os
from functools import cache

import anthropic
import openai

from .errors import UpstreamError, from_sdk


def _timeout() -> float:
    return float(os.environ.get("UPSTREAM_TIMEOUT", "60"))


@cache
def openai_client() -> openai.OpenAI:
    # No SDK retries: a retry spends the user's money twice; the caller sees Retry-After.
    return openai.OpenAI(max_retries=0, timeout=_timeout())


@cache
def anthropic_client() -> anthropic.Anthropic:
    return anthropic.Anthropic(max_retries=0, timeout=_timeout())


def openai_complete(model: str, message: str, user: str, max_tokens: int) -> str:
    try:
        result = openai_client().chat.completions.create(
            model=model, messages=[{"role": "user", "content": message}], max_tokens=max_tokens,
        )
    except openai.OpenAIError as exc:
        raise from_sdk(exc, "openai") from None
    if not result.choices:
        raise UpstreamError(502, "upstream_error", "The openai API returned no choices.")
    return result.choices[0].message.content or ""


def anthropic_complete(model: str, message: str, user: str, max_tokens: int) -> str:
    try:
        result = anthropic_client().messages.create(
            model=model, max_tokens=max_tokens, messages=[{"role": "user", "content": message}],
        )
    except anthropic.AnthropicError as exc:
        raise from_sdk(exc, "anthropic") from None
    return "".join(block.text for block in result.content if block.type == "text")
