"""/v1: the OpenAI- and Anthropic-compatible APIs, one :func:`serve` flow per request and one
:class:`Dialect` per provider API (its field names, error shapes and headers)."""

from __future__ import annotations

from flask import Blueprint, Response

from limiting.web.payer import plan

from .anthropic import ANTHROPIC_DIALECT
from .dialect import Dialect
from .openai import OPENAI_DIALECT
from .serve import serve

openai_bp = Blueprint("openai_api", __name__)
anthropic_bp = Blueprint("anthropic_api", __name__)


@openai_bp.post("/v1/chat/completions")
# Who pays: the API key's user (read as OpenAI's clients send it); refusals in its shape.
@plan(user_from="key", read_key=OPENAI_DIALECT.api_key, render=OPENAI_DIALECT.refusal)
def chat_completions() -> Response:
    return serve(OPENAI_DIALECT)


@anthropic_bp.post("/v1/messages")
@plan(user_from="key", read_key=ANTHROPIC_DIALECT.api_key,
      render=ANTHROPIC_DIALECT.refusal)
def messages() -> Response:
    return serve(ANTHROPIC_DIALECT)


__all__ = ["ANTHROPIC_DIALECT", "OPENAI_DIALECT", "Dialect", "anthropic_bp", "openai_bp",
           "serve"]
