"""End users behind a key: a SaaS calls with one API key for many customers and names each in
the request (OpenAI's ``user`` / ``safety_identifier``, Anthropic's ``metadata.user_id``).

A plan's ``end_user = {...}`` (read as an org's limits: any subset of a plan's layers) applies
to each end user of each key holder, inside the holder's own limits and in the same
all-or-nothing call. The id is the holder's client's text, so it is hostile: it never reaches a
key, a header or a log as it is (core/naming.py end_user_prefix digests it with its holder,
so another holder's "alice" is another subject), and an absurd one is refused before anything
is charged. Ids are exact strings: "Alice", "alice" and "alice " are three end users.

The layers are named ``end_user/<layer>`` ("end_user/quota-day", the requests bucket
"end_user/rate") in 429 bodies, logs and RateLimit headers: never the id itself.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .layers import CompiledPlan, compile_plan, llm_layers, request_layers
from .policy import Plan

# As long as a user id may be (core/naming.py MAX_USER_ID_LENGTH), and Anthropic's own bound
# on metadata.user_id: longer is no one's real customer id.
MAX_END_USER_LENGTH = 256
PREFIX = "end_user/"


class BadEndUser(ValueError):
    """An end-user id the request may not name (the caller's 400)."""


def end_user_id(value: Any) -> str | None:
    """The end user a request names: None when it names none (absent, null or ""); a string of
    at most MAX_END_USER_LENGTH characters as it is; anything else raises BadEndUser."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadEndUser("must be a string.")
    if len(value) > MAX_END_USER_LENGTH:
        raise BadEndUser(f"must be at most {MAX_END_USER_LENGTH} characters.")
    return value


def end_user_layer_name(layer: str) -> str:
    return PREFIX + ("rate" if layer == "user" else layer)


def compile_end_user(limits: Plan, llm: bool = False, cost: int = 1) -> CompiledPlan:
    """The script arguments of a plan's ``end_user`` layers (request layers; with ``llm`` its
    tokens, dollars and requests in flight too), compiled bare as an org's are. Not
    ``shared``: only that one end user's requests reach them, as a user's own."""
    layers = request_layers(limits) + (llm_layers(limits) if llm else ())
    named = tuple(replace(layer, name=end_user_layer_name(layer.name)) for layer in layers)
    return replace(compile_plan(None, named, cost), plan=limits)


def limited_end_user(plan: Plan, value: Any) -> str | None:
    """The end user a request charges on ``plan``: None when the plan limits no end users
    (the id is then ignored: no check, no store work) or the request names none; raises
    BadEndUser for an id :func:`end_user_id` refuses."""
    if plan.end_user is None:
        return None
    return end_user_id(value)
