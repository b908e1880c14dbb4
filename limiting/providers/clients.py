"""The official SDK clients, one per worker process, created after the fork."""

from __future__ import annotations

import itertools
import os
from functools import cache
from typing import TYPE_CHECKING

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
