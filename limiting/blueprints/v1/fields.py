"""Body checks shared by the /v1 dialects, all before any limit is charged: bad input is the
caller's 400 and costs nothing."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from werkzeug.exceptions import BadRequest, RequestEntityTooLarge

from limiting.core.end_users import BadEndUser, limited_end_user
from limiting.core.llm import IMAGE_TOKENS, UnpricedContent, estimate_input_tokens
from limiting.core.policy import ModelPolicy, Plan
from limiting.core.pricing import PriceTerms, PricingError
from limiting.providers import UnknownModel, check_available, provider_for
from limiting.web.extension import current_limiter

from ..validation import json_object
from .problems import NOT_FOUND, ApiProblem, invalid

# No model generates more in one answer (the largest allow ~128k); 10**400 is an attack.
MAX_TOKENS_CAP = 1_000_000
ECHO = "echo"
# Where a model of another provider is served, for the 404's hint.
OTHER_PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}


def read_body() -> dict[str, Any]:
    try:
        return json_object()
    except RequestEntityTooLarge:
        raise
    except BadRequest as exc:
        raise invalid(str(exc.description)) from None


def model_field(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise invalid("'model' is required and must be a non-empty string.", "model")
    return model


def optional_bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be a boolean.", name)
    return value


def optional_positive_int(body: Mapping[str, Any], name: str,
                          most: int = MAX_TOKENS_CAP) -> int | None:
    """An integer in 1..``most``: beyond it no model answers, and an unbounded one (10**400)
    would overflow the dollar estimate, so it is the caller's 400, never our 500."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise invalid(f"'{name}' must be an integer from 1 to {most:,}.", name)
    return value


def messages_field(body: Mapping[str, Any], *, null_content_ok: bool = False
                   ) -> list[dict[str, Any]]:
    """A non-empty list of {role: str, content: str | list} objects.

    ``null_content_ok``: OpenAI lets an assistant turn that only calls tools have no content.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array.", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid(f"'messages[{i}]' must be an object with a string 'role'.",
                          f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, (str, list)):
            continue
        if content is None and null_content_ok and message["role"] == "assistant":
            continue
        raise invalid(f"'messages[{i}].content' must be a string or an array.",
                      f"messages[{i}].content")
    return messages


def unknown_fields(body: Mapping[str, Any], known: frozenset[str]) -> None:
    """Refuse fields we would not forward: silently dropping them would change the answer."""
    for name in body:
        if name not in known:
            raise invalid(f"Unrecognized request argument supplied: {name}", name)


def passthrough(body: Mapping[str, Any], names: frozenset[str]) -> dict[str, Any]:
    """The fields forwarded upstream as the client sent them."""
    return {k: v for k, v in body.items() if k in names and v is not None}


def provider_of(model: str, not_found: str, serves: str) -> tuple[str, ModelPolicy | None]:
    """The model's provider (404 with the dialect's ``not_found`` message when the policy does
    not list it, or lists it under a provider other than ``serves``, the dialect's own: its
    SDK, usage reader and rate-limit headers are that provider's, and the guard would learn
    one provider's headers as another's pacing; the server holding no key for it is refused
    too) and its priced entry. ``echo`` answers in either API."""
    policy = current_limiter().policy
    try:
        provider = provider_for(model, policy)
    except UnknownModel:
        raise ApiProblem(404, NOT_FOUND, not_found, code="model_not_found") from None
    if provider not in (serves, ECHO):
        elsewhere = OTHER_PATHS.get(provider)
        hint = f" It is served at {elsewhere}." if elsewhere else ""
        raise ApiProblem(404, NOT_FOUND, not_found + hint, code="model_not_found")
    check_available(provider, model)
    return provider, policy.model(model)


def price_terms(terms: Callable[[], PriceTerms]) -> PriceTerms:
    """What prices the call beyond its tokens; a term the model has no price for is a 400."""
    try:
        return terms()
    except PricingError as exc:
        raise invalid(exc.message, exc.param) from None


def estimate(messages: list[dict[str, Any]], system: Any = None, tools: Any = None, *,
             functions: Any = None, response_format: Any = None, tool_choice: Any = None,
             name: str, model: ModelPolicy | None = None) -> int:
    """The input reservation of a request to model ``name``: every part the provider renders
    into the prompt and bills (limiting.core.prompt), images at the model's ``image_tokens``.
    Content that cannot be priced before the call is a 400."""
    image_tokens = model.image_tokens if model is not None else IMAGE_TOKENS
    try:
        return estimate_input_tokens(messages, system, image_tokens, model=name, tools=tools,
                                     functions=functions, response_format=response_format,
                                     tool_choice=tool_choice)
    except UnpricedContent as exc:
        raise invalid(str(exc), "messages") from None
    except RecursionError:   # a schema or content nested deeper than it can be measured
        raise invalid("The request is nested too deeply to be priced.") from None


def end_user_field(plan: Plan, named: Callable[[], tuple[str, Any]]) -> str | None:
    """The end user the body names (``named()``: the dialect's field and its value), when
    ``plan`` limits end users; an absurd id is the caller's 400 before anything is charged."""
    if plan.end_user is None:
        return None
    param, value = named()
    try:
        return limited_end_user(plan, value)
    except BadEndUser as exc:
        raise invalid(f"'{param}' {exc}", param) from None
