"""/v1: the OpenAI- and Anthropic-compatible APIs, one :func:`serve` flow per request and one
:class:`Dialect` per provider API (its field names, error shapes and headers)."""

from __future__ import annotations

from flask import Blueprint, Response

from limiting import limited_route

from .anthropic import ANTHROPIC_DIALECT
from .dialect import Dialect
from .openai import OPENAI_DIALECT
from .serve import serve

openai_bp = Blueprint("openai_api", __name__)
anthropic_bp = Blueprint("anthropic_api", __name__)


@openai_bp.post("/v1/chat/completions")
@limited_route
def chat_completions() -> Response:
    return serve(OPENAI_DIALECT)


@anthropic_bp.post("/v1/messages")
@limited_route
def messages() -> Response:
    return serve(ANTHROPIC_DIALECT)


__all__ = ["ANTHROPIC_DIALECT", "OPENAI_DIALECT", "Dialect", "anthropic_bp", "openai_bp",
           "serve"]
