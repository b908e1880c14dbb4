"""Upstream models: ``echo`` answers locally; OpenAI and Anthropic models go through their SDKs."""

from __future__ import annotations

import os
from collections.abc import Mapping

from limiting.core.policy import ModelPolicy, Policy
from limiting.provider_keys import PROVIDER_KEYS

from .apis import ANTHROPIC, OPENAI, ProviderAPI, api_for
from .errors import UpstreamError
from .request import LLMRequest


class UnknownModel(ValueError):
    """The model is not under the policy's [models] (nor an alias of one): it has no price
    and no guard, so it is refused before anything is charged."""

    def __init__(self, model: str, message: str | None = None) -> None:
        super().__init__(message or f"The model {model!r} does not exist.")
        self.model = model


class ProviderKeyMissing(UnknownModel):
    """The model is known, but the server holds no key for its provider."""


def provider_for(model: str, policy: Policy | Mapping[str, ModelPolicy]) -> str:
    """The provider behind ``model`` (or one of its aliases) from the policy's [models]; the
    name alone decides nothing, or any new snapshot would go upstream unpriced."""
    if model == "echo":
        return "echo"
    found = policy.model(model) if isinstance(policy, Policy) else policy.get(model)
    if found is None:
        raise UnknownModel(model)
    return found.provider


def check_available(provider: str, model: str) -> None:
    """Refuse before any limit is charged when the server holds no key for the provider."""
    env = PROVIDER_KEYS.get(provider)
    if env and not os.environ.get(env):
        raise ProviderKeyMissing(model, f"model {model!r} needs {env} to be set on the server")


__all__ = ["ANTHROPIC", "OPENAI", "LLMRequest", "ProviderAPI", "ProviderKeyMissing",
           "UnknownModel", "UpstreamError", "api_for", "check_available", "provider_for"]
