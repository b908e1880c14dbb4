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

REQUEST_LAYERS = ("user",)          # plus every "quota-*" layer
TOKEN_LAYER = "tokens-minute"
INPUT_TOKEN_LAYER = "input-tokens-minute"
OUTPUT_TOKEN_LAYER = "output-tokens-minute"


def is_request_layer(name: str) -> bool:
    """Layers that count requests (the user's bucket and plan quotas), not the edge per IP."""
    return name in REQUEST_LAYERS or name.startswith("quota-")


def is_token_layer(name: str) -> bool:
    return name in (TOKEN_LAYER, INPUT_TOKEN_LAYER, OUTPUT_TOKEN_LAYER)


def tightest(decision: Decision, accept: Callable[[str], bool]) -> LayerState | None:
    """The accepted layer with the least remaining (the longer reset breaks a tie), or None."""
    states = [s for s in decision.states if accept(s.layer.name)]
    if not states:
        return None
    return min(states, key=lambda s: (s.remaining, -s.reset))


def layer(decision: Decision, name: str) -> LayerState | None:
    for state in decision.states:
        if state.layer.name == name:
            return state
    return None


def request_layer(decision: Decision) -> LayerState | None:
    """The request layer a client runs out of first."""
    return tightest(decision, is_request_layer)


def token_layer(decision: Decision) -> LayerState | None:
    """tokens-minute when the plan has it, else input-, else output-tokens-minute."""
    for name in (TOKEN_LAYER, INPUT_TOKEN_LAYER, OUTPUT_TOKEN_LAYER):
        state = layer(decision, name)
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
    combined = layer(decision, TOKEN_LAYER)
    inputs = layer(decision, INPUT_TOKEN_LAYER) or combined
    outputs = layer(decision, OUTPUT_TOKEN_LAYER) or combined
    tokens = combined or tightest(decision, lambda n: n in (INPUT_TOKEN_LAYER, OUTPUT_TOKEN_LAYER))
    headers: dict[str, str] = {}
    for kind, state in (("requests", request_layer(decision)), ("tokens", tokens),
                        ("input-tokens", inputs), ("output-tokens", outputs)):
        if state is None:
            continue
        headers[f"anthropic-ratelimit-{kind}-limit"] = _limit(state)
        headers[f"anthropic-ratelimit-{kind}-remaining"] = str(max(0, state.remaining))
        headers[f"anthropic-ratelimit-{kind}-reset"] = rfc3339_after(state.reset, now)
    return headers


def openai_error_type(layer_name: str) -> str:
    """OpenAI's 429 ``type``: "tokens" for token and spend layers, "requests" otherwise."""
    if is_token_layer(layer_name) or layer_name.startswith("usd-"):
        return "tokens"
    return "requests"
