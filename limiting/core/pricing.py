"""What an LLM call costs, in micro-dollars: the reservation's ceiling and the settle's bill.

A price per million tokens is micro-dollars per token. The reservation must never be below
what the call can cost, so it prices the whole prompt at the highest input-side price that
can apply and adds every server-tool use the request allows; the settle prices what the
provider reported with the same terms. Anything that cannot be priced is refused before a
single unit is charged (:class:`PricingError`, a 400 at the HTTP face).

Core module: no Flask or redis import.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .llm import Usage
from .policy import ModelPolicy

# Tiers every provider bills at the model's own prices (Anthropic's "standard_only" included).
STANDARD_TIERS = ("auto", "default", "standard_only")
# Names a response gives the standard tier it was served at (OpenAI, Anthropic).
SERVED_STANDARD = ("default", "standard")
# Anthropic's server tools: run (and, for web search, billed per use) on the provider's side.
SERVER_TOOL_PREFIXES = ("web_search_", "web_fetch_", "code_execution_")
MAX_TOOL_USES = 1000   # per tool and request; far above what a sane agent asks for


class PricingError(ValueError):
    """The request asks for something the model has no price for; ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message, self.param = message, param


@dataclass(frozen=True, slots=True)
class PriceTerms:
    """What, besides tokens, decides one call's price: fixed at reservation, used to settle."""

    tier: float = 1.0               # the service tier's price multiplier
    cache_writes: bool = False      # the request may write the prompt cache (cache_control)
    server_tool_uses: int = 0       # the most server-tool uses the request allows


STANDARD = PriceTerms()


def _input(model: ModelPolicy) -> float:
    return model.input_usd_per_million or 0.0


def cached_price(model: ModelPolicy) -> float:
    """Cache reads; default half the input price."""
    if model.cached_input_usd_per_million is None:
        return _input(model) / 2
    return model.cached_input_usd_per_million


def cache_write_price(model: ModelPolicy) -> float:
    """5-minute cache writes; default 1.25x the input price, as Anthropic bills them."""
    if model.cache_write_usd_per_million is None:
        return _input(model) * 1.25
    return model.cache_write_usd_per_million


def cache_write_1h_price(model: ModelPolicy) -> float:
    """1-hour cache writes; default 2x the input price."""
    if model.cache_write_1h_usd_per_million is None:
        return _input(model) * 2
    return model.cache_write_1h_usd_per_million


def tier_multiplier(model: ModelPolicy | None, tier: Any) -> float:
    """The multiplier to reserve a request's ``service_tier`` at: the dearest tier it lets the
    provider choose. Absent or ``auto``: any tier the model lists (a project's default tier,
    Anthropic's priority capacity), and never below 1.0; ``default``/``standard_only``: the
    standard price; a listed tier: its own."""
    if tier is not None and not isinstance(tier, str):
        raise PricingError("'service_tier' must be a string.", "service_tier")
    if model is None:              # echo bills nothing at any tier
        return 1.0
    if tier is None or tier == "auto":
        return max([1.0, *model.service_tiers.values()])
    if tier in model.service_tiers:
        return model.service_tiers[tier]
    if tier in STANDARD_TIERS:
        return 1.0
    raise PricingError(f"The service tier {tier!r} is not priced for model {model.name!r}; "
                       f"use one of: {', '.join(_tiers(model))}.", "service_tier")


def served_terms(model: ModelPolicy | None, terms: PriceTerms, served: str | None
                 ) -> PriceTerms:
    """``terms`` at the tier the provider reported serving (OpenAI's ``service_tier``,
    Anthropic's ``usage.service_tier``): a listed tier at its price, the standard tier at
    1.0; none reported, or one we have no price for, keeps the tier reserved."""
    if model is None or not isinstance(served, str):
        return terms
    if served in model.service_tiers:
        tier = model.service_tiers[served]
    elif served in SERVED_STANDARD:
        tier = 1.0
    else:
        return terms
    return replace(terms, tier=tier)


def _tiers(model: ModelPolicy) -> list[str]:
    return [*STANDARD_TIERS, *(t for t in model.service_tiers if t not in STANDARD_TIERS)]


def server_tool_uses(model: ModelPolicy | None, tools: Any) -> int:
    """The most server-tool uses ``tools`` allow; refuses a server tool with no bound
    (``max_uses``) or on a model with no server-tool price, as neither can be reserved."""
    if not isinstance(tools, list):
        return 0
    total = 0
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, Mapping) else None
        if not isinstance(kind, str) or not kind.startswith(SERVER_TOOL_PREFIXES):
            continue
        if model is None or model.server_tool_usd_per_use is None:
            name = model.name if model is not None else "echo"
            raise PricingError(f"Server tools ({kind}) are not priced for model {name!r}.",
                               f"tools[{i}]")
        uses = tool.get("max_uses")
        if isinstance(uses, bool) or not isinstance(uses, int) or not 1 <= uses <= MAX_TOOL_USES:
            raise PricingError(f"'tools[{i}].max_uses' is required for the server tool {kind} "
                               f"(an integer from 1 to {MAX_TOOL_USES}): each use is billed.",
                               f"tools[{i}].max_uses")
        total += uses
    return total


def has_cache_control(value: Any) -> bool:
    """Does ``cache_control`` appear anywhere in a request body? (No recursion: a body is as
    deep as the client made it.)"""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            if "cache_control" in item:
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _tool_fee(model: ModelPolicy, uses: int) -> float:
    return uses * (model.server_tool_usd_per_use or 0.0) * 1e6


def reserve_usd_micros(model: ModelPolicy | None, input_tokens: int, max_output_tokens: int,
                       terms: PriceTerms = STANDARD) -> float:
    """The most a call can cost: every prompt token at the dearest input-side price that may
    apply, every allowed output token, every allowed server-tool use."""
    if model is None:
        return 0.0
    per_input = max(_input(model), cached_price(model))
    if terms.cache_writes:
        per_input = max(per_input, cache_write_price(model), cache_write_1h_price(model))
    tokens = input_tokens * per_input + max_output_tokens * (model.output_usd_per_million or 0.0)
    return tokens * terms.tier + _tool_fee(model, terms.server_tool_uses)


def usage_usd_micros(model: ModelPolicy | None, usage: Usage,
                     terms: PriceTerms = STANDARD) -> float:
    """What a provider's reported usage bills: cache reads, writes and plain input apart."""
    if model is None:
        return 0.0
    cached = min(usage.cached_input_tokens, usage.input_tokens)
    writes, writes_1h = usage.cache_write_tokens, usage.cache_write_1h_tokens
    fresh = max(0, usage.input_tokens - cached - writes - writes_1h)
    tokens = (fresh * _input(model) + cached * cached_price(model)
              + writes * cache_write_price(model) + writes_1h * cache_write_1h_price(model)
              + usage.output_tokens * (model.output_usd_per_million or 0.0))
    return tokens * terms.tier + _tool_fee(model, usage.server_tool_uses)

