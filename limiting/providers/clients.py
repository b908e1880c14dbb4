"""The official SDK clients, one per worker process, created after the fork.

Each client's HTTP layer tells :func:`watching` when a request is about to leave, so a call
that failed before (a body the SDK could not serialise, a client it could not build) is known
never to have reached the provider, and is not billed."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from contextvars import ContextVar
from functools import cache
from typing import TYPE_CHECKING, Any

from ..provider_keys import keyed_providers

if TYPE_CHECKING:  # imported at the first call instead: see errors.py
    import ssl

    import anthropic
    import openai


def _timeout() -> float:
    return float(os.environ.get("UPSTREAM_TIMEOUT", "60"))


# httpcore's pool does O(n²) bookkeeping over its n connections on every request it adds or
# removes; with hundreds of calls in flight per worker that dominated the CPU profile. A few
# clients taken in turn keep each pool small.
SHARDS = max(1, int(os.environ.get("UPSTREAM_CLIENTS", "8")))
_turn = itertools.count()


# This call's "did a request leave?" box: a context variable, so each thread or greenlet
# has its own; None outside :func:`watching`.
_SENT: ContextVar[list[bool] | None] = ContextVar("limiting_upstream_sent", default=None)


def _leaving(request: Any) -> None:
    """httpx's request hook: runs after the request is built (its body encoded) and just
    before it is sent."""
    sent = _SENT.get()
    if sent is not None:
        sent.append(True)


@contextlib.contextmanager
def watching() -> Iterator[list[bool]]:
    """A box that is non-empty once a request of this call left for the provider."""
    sent: list[bool] = []
    token = _SENT.set(sent)
    try:
        yield sent
    finally:
        _SENT.reset(token)


def _hooks() -> dict[str, list[Any]]:
    return {"request": [_leaving]}


@cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every client of the worker, made as httpx makes its default one:
    each client made its own, loading the CA bundle again (16 of them: a second of CPU at
    every worker's start, and the bundle held 16 times)."""
    import httpx

    return httpx.create_ssl_context()


@cache
def _openai_clients() -> tuple[openai.OpenAI, ...]:
    import openai

    # No SDK retries: a retry spends the user's money twice; the caller sees Retry-After.
    return tuple(openai.OpenAI(max_retries=0, timeout=_timeout(),
                               http_client=openai.DefaultHttpxClient(event_hooks=_hooks(),
                                                                     verify=_tls()))
                 for _ in range(SHARDS))


@cache
def _anthropic_clients() -> tuple[anthropic.Anthropic, ...]:
    import anthropic

    return tuple(anthropic.Anthropic(max_retries=0, timeout=_timeout(),
                                     http_client=anthropic.DefaultHttpxClient(
                                         event_hooks=_hooks(), verify=_tls()))
                 for _ in range(SHARDS))


def openai_client() -> openai.OpenAI:
    clients = _openai_clients()
    return clients[next(_turn) % len(clients)]


def anthropic_client() -> anthropic.Anthropic:
    clients = _anthropic_clients()
    return clients[next(_turn) % len(clients)]


def warm() -> None:
    """Import the SDK of each provider whose key is set and make its clients, so the first
    call does not pay for the import (gunicorn.conf.py calls this in every new worker)."""
    keyed = keyed_providers()
    if "openai" in keyed:
        _openai_clients()
    if "anthropic" in keyed:
        _anthropic_clients()


def reset() -> None:
    """Forget the clients (they read OPENAI_*/ANTHROPIC_* from the environment once)."""
    _openai_clients.cache_clear()
    _anthropic_clients.cache_clear()
    _tls.cache_clear()
