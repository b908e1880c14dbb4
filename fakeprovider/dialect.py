"""What differs between providers, as one interface the request pipeline calls.

Each provider (OpenAI, Anthropic) has its own auth header, error body shape,
rate-limit header names and response/stream format; the pipeline in
:mod:`fakeprovider.app` stays provider-agnostic by going through this.
"""

from __future__ import annotations

import json
import secrets
import string
from abc import ABC, abstractmethod
from typing import Any

from . import render
from .meter import Generation
from .ratelimit import Refusal, Snapshot
from .server import Exchange, Headers
from .state import Billing
from .tokens import Completion

_ALPHABET = string.ascii_letters + string.digits


class BadRequest(Exception):
    """Invalid request body; becomes a 400 in the provider's error shape."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def random_id(prefix: str, length: int = 24) -> str:
    """A provider-looking identifier such as ``chatcmpl-…`` or ``msg_…``."""
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def new_request_id() -> str:
    """A request id for the ``x-request-id`` / ``request-id`` headers."""
    return "req_" + secrets.token_hex(16)


def dumps(payload: Any) -> str:
    """Compact JSON, as the providers send it."""
    return json.dumps(payload, separators=(",", ":"))


def optional_positive_int(body: dict[str, Any], key: str) -> int | None:
    """``body[key]`` if it is a positive int, None if absent/null; else BadRequest."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"Invalid '{key}': expected an integer >= 1, got {value!r}.", key)
    return value


def require_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The non-empty ``messages`` list of objects each with a string role; else BadRequest."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(
            "'messages' is a required property and must be a non-empty array.", "messages"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(
                f"Invalid 'messages[{i}]': expected an object with a string 'role'.",
                f"messages[{i}]",
            )
    return messages


def require_model(body: dict[str, Any]) -> str:
    """The string ``model``; else BadRequest."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("You must provide a model parameter.", "model")
    return model


def optional_bool(body: dict[str, Any], key: str) -> bool:
    """``body[key]`` as a bool (absent/null = False); else BadRequest."""
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"Invalid '{key}': expected a boolean, got {value!r}.", key)
    return value


class Dialect(ABC):
    """One provider's wire protocol."""

    name: str

    def id_headers(self, request_id: str) -> Headers:
        """Both providers' request-id headers (clients read one or the other)."""
        return [("x-request-id", request_id), ("request-id", request_id)]

    @abstractmethod
    def error_body(
        self, status: int, message: str | None, request_id: str, param: str | None = None
    ) -> Any:
        """The provider's JSON error body for ``status`` (None message = stock text)."""

    @abstractmethod
    def api_key(self, headers: dict[str, str]) -> str:
        """The credential the request carries ("" when none); the meter bills per key."""

    def authorized(self, headers: dict[str, str]) -> bool:
        """Whether the request carries a (non-empty) credential."""
        return bool(self.api_key(headers))

    @abstractmethod
    def unauthorized_message(self) -> str:
        """Text of the 401 error."""

    @abstractmethod
    def plan(self, body: Any, cached: tuple[int, int], billing: Billing) -> Completion:
        """Validate the body and decide the reply; raises BadRequest."""

    @abstractmethod
    def quota_headers(self, snap: Snapshot) -> Headers:
        """Rate-limit headers in the provider's naming and formats."""

    @abstractmethod
    def refusal_body(self, refusal: Refusal, request_id: str) -> Any:
        """The 429 body for a refusal by the fake's own limits."""

    @abstractmethod
    async def respond(self, ex: Exchange, completion: Completion, headers: Headers,
                      chunk_delay: float, disconnect: bool, bill: Generation) -> None:
        """Send the successful reply, JSON or streamed, billing output as it is generated.

        A plain reply is billed whole before it is sent; a stream bills each
        chunk's tokens before writing it, so a chunk whose write fails (the
        client hung up) is still billed, and nothing after it is generated.
        """


def billed_prompt(body: dict[str, Any], billing: Billing) -> int | None:
    """The prompt billed by a real tokenizer when ``billing`` asks and one is installed; None:
    the word rule of :mod:`fakeprovider.tokens`."""
    return render.prompt_tokens(body) if billing.tokenizer and render.available() else None


def served_tier(body: dict[str, Any], billing: Billing, standard: str,
                named: dict[str, str]) -> tuple[str, float]:
    """(the tier the reply reports, its price multiplier): the request's own tier (``named``
    renames a request's tier to the one reported), else the fake's ``auto_tier``."""
    asked = body.get("service_tier")
    if isinstance(asked, str) and asked != "auto":
        tier = named.get(asked, asked)
    else:
        tier = billing.auto_tier or standard
    return tier, billing.tiers.get(tier, 1.0)


def bearer_token(headers: dict[str, str]) -> str:
    """The token of ``Authorization: Bearer <token>``, or "" when there is none."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""
