"""/v1: the OpenAI- and Anthropic-compatible APIs, one :func:`serve` flow per request and one
:class:`Dialect` per provider API (its field names, error shapes and headers)."""

from __future__ import annotations

from flask import Blueprint, Response

from limiting import Early, limited_route

from .anthropic import ANTHROPIC_DIALECT
from .dialect import Dialect
from .openai import OPENAI_DIALECT
from .problems import refused
from .serve import serve

openai_bp = Blueprint("openai_api", __name__)
anthropic_bp = Blueprint("anthropic_api", __name__)


def _early(dialect: Dialect) -> Early:
    """The door's view of a dialect: the key as it reads it, a refusal in its error shape."""
    return Early(key=dialect.api_key,
                 render=lambda decision: dialect.render(refused(decision,
                                                                dialect.provider_headers)))


@openai_bp.post("/v1/chat/completions")
@limited_route(early=_early(OPENAI_DIALECT))
def chat_completions() -> Response:
    return serve(OPENAI_DIALECT)


@anthropic_bp.post("/v1/messages")
@limited_route(early=_early(ANTHROPIC_DIALECT))
def messages() -> Response:
    return serve(ANTHROPIC_DIALECT)


__all__ = ["ANTHROPIC_DIALECT", "OPENAI_DIALECT", "Dialect", "anthropic_bp", "openai_bp",
           "serve"]
