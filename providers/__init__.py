"""Upstream models: ``echo`` answers locally; OpenAI and Anthropic models go through their SDKs."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from limiting.llm import Usage
from limiting.policy import ModelPolicy

from .errors import UpstreamError

_PREFIXES = {"gpt-": "openai", "o1": "openai", "o3": "openai", "o4": "openai",
             "chatgpt-": "openai", "claude-": "anthropic"}
_KEYS = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


Observe = Callable[[Mapping[str, str], int, int], None]  # headers, status, tokens


class UnknownModel(ValueError):
    pass


def provider_for(model: str, models: Mapping[str, ModelPolicy]) -> str:
    """The provider behind ``model``: the policy's [models] table first, then the name."""
    if model == "echo":
        return "echo"
    if model in models:
        return models[model].provider
    for prefix, provider in _PREFIXES.items():
        if model.startswith(prefix):
            return provider
    raise UnknownModel(f"unknown model {model!r}")


def check_available(provider: str, model: str) -> None:
    """Refuse before any limit is charged when the server holds no key for the provider."""
    env = _KEYS.get(provider)
    if env and not os.environ.get(env):
        raise UnknownModel(f"model {model!r} needs {env} to be set on the server")


def complete(provider: str, model: str, message: str, max_tokens: int, observe: Observe
             ) -> tuple[str, Usage]:
    """One plain chat turn, for /chat: the reply and what it really used."""
    if provider == "echo":
        reply = " ".join(f"echo: {message}".split()[: max_tokens])
        return reply, Usage(len(message.split()) + 4, len(reply.split()))
    from . import clients

    call = clients.openai_complete if provider == "openai" else clients.anthropic_complete
    text, used_in, used_out, cached = call(model, message, max_tokens, observe)
    return text, Usage(used_in, used_out, cached)


__all__ = ["UnknownModel", "UpstreamError", "check_available", "complete", "provider_for"]
