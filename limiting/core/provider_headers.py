"""Our layers in the OpenAI and Anthropic rate-limit header dialects.

SDK users and gateways already parse ``x-ratelimit-*`` (OpenAI) and ``anthropic-ratelimit-*``
(Anthropic); speaking those dialects lets them pace against our limits with code they have.
Every function here is pure: a Decision (and, for absolute times, ``now``) in, strings out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime

from .decision import Decision, LayerState

TOKEN_UNITS = ("tokens", "input_tokens", "output_tokens")


def is_request_layer(state: LayerState) -> bool:
    """Layers that count requests (the user's bucket and plan quotas), not the edge per IP."""
    return state.layer.unit == "requests" and not state.layer.kind.per_ip


def tightest(decision: Decision, accept: Callable[[LayerState], bool]) -> LayerState | None:
    """The accepted layer with the least remaining (the longer reset breaks a tie), or None."""
    states = [s for s in decision.states if accept(s)]
    if not states:
        return None
    return min(states, key=lambda s: (s.remaining, -s.reset))


def layer(decision: Decision, unit: str) -> LayerState | None:
    """The decision's layer counting ``unit`` (a plan has at most one per token unit)."""
    for state in decision.states:
        if state.layer.unit == unit:
            return state
    return None


def request_layer(decision: Decision) -> LayerState | None:
    """The request layer a client runs out of first."""
    return tightest(decision, is_request_layer)


def token_layer(decision: Decision) -> LayerState | None:
    """tokens-minute when the plan has it, else input-, else output-tokens-minute."""
    for unit in TOKEN_UNITS:
        state = layer(decision, unit)
        if state is not None:
            return state
    return None


def openai_duration(seconds: float) -> str:
    """A Go-style duration as OpenAI's reset headers write it: "12ms", "1s", "6m0s", "1h0m0s"."""
    total_ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if total_ms == 0:
        return "0s"
    if total_ms < 1000:
        return f"{total_ms}ms"
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, ms = divmod(rest, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    text = f"{secs}s"
    if hours or minutes:
        text = f"{minutes}m{text}"
    if hours:
        text = f"{hours}h{text}"
    return text


def rfc3339_after(seconds: float, now: float) -> str:
    """UTC time ``seconds`` after ``now`` (epoch seconds), rounded up, as Anthropic sends it."""
    moment = datetime.fromtimestamp(math.ceil(now + max(0.0, seconds)), tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _limit(state: LayerState) -> str:
    return str(int(state.layer.limit))


def openai_headers(decision: Decision) -> dict[str, str]:
    """x-ratelimit-{limit,remaining,reset}-{requests,tokens} from the tightest layers."""
    headers: dict[str, str] = {}
    for kind, state in (("requests", request_layer(decision)), ("tokens", token_layer(decision))):
        if state is None:
            continue
        headers[f"x-ratelimit-limit-{kind}"] = _limit(state)
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, state.remaining))
        headers[f"x-ratelimit-reset-{kind}"] = openai_duration(state.reset)
    return headers


def anthropic_headers(decision: Decision, now: float) -> dict[str, str]:
    """anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}.

    "tokens" is tokens-minute, else the tighter of the input/output layers (Anthropic's own
    meaning: the most restrictive token limit in effect); input/output fall back to
    tokens-minute, which bounds them too.
    """
    combined = layer(decision, "tokens")
    inputs = layer(decision, "input_tokens") or combined
    outputs = layer(decision, "output_tokens") or combined
    tokens = combined or tightest(
        decision, lambda s: s.layer.unit in ("input_tokens", "output_tokens"))
    headers: dict[str, str] = {}
    for kind, state in (("requests", request_layer(decision)), ("tokens", tokens),
                        ("input-tokens", inputs), ("output-tokens", outputs)):
        if state is None:
            continue
        headers[f"anthropic-ratelimit-{kind}-limit"] = _limit(state)
        headers[f"anthropic-ratelimit-{kind}-remaining"] = str(max(0, state.remaining))
        headers[f"anthropic-ratelimit-{kind}-reset"] = rfc3339_after(state.reset, now)
    return headers


def openai_error_type(unit: str) -> str:
    """OpenAI's 429 ``type`` for a refusing layer's unit: "tokens" for token and spend
    layers, "requests" otherwise."""
    return "tokens" if unit in TOKEN_UNITS or unit == "usd_micros" else "requests"
