"""The official SDK clients, one per worker process, created after the fork."""

from __future__ import annotations

import itertools
import os
from functools import cache
from typing import TYPE_CHECKING

from limiting.core.llm import estimate_input_tokens

from .errors import Observe, UpstreamError, guarded_call

if TYPE_CHECKING:  # imported at the first call instead: see errors.py
    import anthropic
    import openai


def _timeout() -> float:
    return float(os.environ.get("UPSTREAM_TIMEOUT", "60"))


# httpcore's pool does O(n²) bookkeeping over its n connections on every request it adds or
# removes; with hundreds of calls in flight per worker that dominated the CPU profile. A few
# clients taken in turn keep each pool small.
SHARDS = max(1, int(os.environ.get("UPSTREAM_CLIENTS", "8")))
_turn = itertools.count()


@cache
def _openai_clients() -> tuple[openai.OpenAI, ...]:
    import openai

    # No SDK retries: a retry spends the user's money twice; the caller sees Retry-After.
    return tuple(openai.OpenAI(max_retries=0, timeout=_timeout()) for _ in range(SHARDS))


@cache
def _anthropic_clients() -> tuple[anthropic.Anthropic, ...]:
    import anthropic

    return tuple(anthropic.Anthropic(max_retries=0, timeout=_timeout()) for _ in range(SHARDS))


def openai_client() -> openai.OpenAI:
    clients = _openai_clients()
    return clients[next(_turn) % len(clients)]


def anthropic_client() -> anthropic.Anthropic:
    clients = _anthropic_clients()
    return clients[next(_turn) % len(clients)]


def warm() -> None:
    """Import the SDK of each provider whose key is set and make its clients, so the first
    call does not pay for the import (gunicorn.conf.py calls this in every new worker)."""
    if os.environ.get("OPENAI_API_KEY"):
        _openai_clients()
    if os.environ.get("ANTHROPIC_API_KEY"):
        _anthropic_clients()


def reset() -> None:
    """Forget the clients (they read OPENAI_*/ANTHROPIC_* from the environment once)."""
    _openai_clients.cache_clear()
    _anthropic_clients.cache_clear()


def _tokens(message: str, max_tokens: int) -> int:
    """The call's tokens as /chat reserved them."""
    return estimate_input_tokens([{"role": "user", "content": message}]) + max_tokens


def openai_complete(model: str, message: str, max_tokens: int, observe: Observe
                    ) -> tuple[str, int, int, int]:
    """(reply, input tokens, output tokens, cached input tokens) of one chat turn."""
    tokens = _tokens(message, max_tokens)
    messages = [{"role": "user", "content": message}]
    raw = guarded_call("openai", observe, tokens, lambda: openai_client().chat.completions
                       .with_raw_response.create(model=model, messages=messages,  # type: ignore[arg-type]
                                                 max_tokens=max_tokens))
    observe(raw.headers, raw.status_code, tokens)
    result = raw.parse()
    if not result.choices:
        raise UpstreamError(502, "upstream_error", "The openai API returned no choices.")
    usage = result.usage
    cached = 0
    if usage is not None and usage.prompt_tokens_details is not None:
        cached = usage.prompt_tokens_details.cached_tokens or 0
    return (result.choices[0].message.content or "",
            usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0, cached)


def anthropic_complete(model: str, message: str, max_tokens: int, observe: Observe
                       ) -> tuple[str, int, int, int]:
    tokens = _tokens(message, max_tokens)
    messages = [{"role": "user", "content": message}]
    raw = guarded_call("anthropic", observe, tokens, lambda: anthropic_client().messages
                       .with_raw_response.create(model=model, max_tokens=max_tokens,
                                                 messages=messages))  # type: ignore[arg-type]
    observe(raw.headers, raw.status_code, tokens)
    result = raw.parse()
    u = result.usage
    cached = u.cache_read_input_tokens or 0
    fresh = u.input_tokens + cached + (u.cache_creation_input_tokens or 0)
    text = "".join(block.text for block in result.content if block.type == "text")
    return text, fresh, u.output_tokens, cached
