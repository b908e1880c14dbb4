"""LLM units: reserve tokens, dollars and a concurrency lease before the upstream call,
settle the actual usage after it. The blueprints see only this module's small surface.

    with limiter.reserve(user, model, input_tokens=est, max_output_tokens=mx) as r:
        ... call upstream, stream ...
        r.settle(Usage(input_tokens=..., output_tokens=..., cached_input_tokens=...))

Leaving the block without a settle applies the rule (limiting.reservation): cancelled only
when the provider certainly did not bill, otherwise charged as reserved. The first finish
wins; the lease is renewed while the block runs; a reservation never finished expires by
itself (leases within their TTL, token windows as their window passes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .documents import UnpricedContent as UnpricedContent
from .prompt import IMAGE_TOKENS as IMAGE_TOKENS
from .prompt import TOKENS_PER_MESSAGE as TOKENS_PER_MESSAGE
from .prompt import estimate_prompt
from .tokenizer import count_tokens, encoding_for


@dataclass(frozen=True, slots=True)
class Usage:
    """What a provider reports an LLM call used, for ``Reservation.settle``: the call is
    charged these tokens (and the dollars priced from them), the rest of its reservation
    given back."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0   # served from the provider's prompt cache: not input-limited
    # Parts of input_tokens written to the prompt cache (Anthropic bills them above input).
    cache_write_tokens: int = 0        # 5-minute writes
    cache_write_1h_tokens: int = 0     # 1-hour writes
    server_tool_uses: int = 0          # billed per use (web search), beside the tokens
    service_tier: str | None = None    # the tier the provider says it served (and bills) at


def estimate_tokens(text: str, model: str | None = None) -> int:
    """Tokens of ``text`` for ``model``, never below the provider's count (see
    :mod:`limiting.core.tokenizer`)."""
    return count_tokens([text], encoding_for(model))


def estimate_input_tokens(messages: Iterable[Mapping[str, Any]], system: Any = None,
                          image_tokens: int = IMAGE_TOKENS, *, model: str | None = None,
                          tools: Any = None, functions: Any = None,
                          response_format: Any = None, tool_choice: Any = None) -> int:
    """Input tokens to reserve for a chat request (OpenAI or Anthropic message shape): never
    below what the provider bills (:mod:`limiting.core.prompt`). Raises UnpricedContent for a
    document or file the limiter cannot price."""
    return estimate_prompt(messages, system, model=model, image_tokens=image_tokens,
                           tools=tools, functions=functions, response_format=response_format,
                           tool_choice=tool_choice)
