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

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


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


# Offline estimate, no tokenizer download: ~3 UTF-8 bytes per token is above what
# OpenAI/Anthropic tokenizers produce for English and code, so reservations err high and
# the settle gives the rest back.
BYTES_PER_TOKEN = 3
TOKENS_PER_MESSAGE = 8


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text.encode("utf-8", "replace")) / BYTES_PER_TOKEN)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping):
                text = part.get("text")
                parts.append(text if isinstance(text, str) else json.dumps(part, default=str))
            else:
                parts.append(str(part))
        return "\n".join(parts)
    return "" if content is None else json.dumps(content, default=str)


# Media the provider bills by what it decodes, not by the bytes we see: an image by URL is a
# hundred bytes and up to ~1,600 tokens (Anthropic's cap; gpt-4o's high detail ~1,445). Models
# that bill images as many more tokens (gpt-4o-mini) set their own ``image_tokens``.
IMAGE_TOKENS = 1600
_IMAGES = frozenset({"image", "image_url", "input_image"})


class UnpricedContent(ValueError):
    """A part whose size only the provider can see (a document or file by URL or id): it
    cannot be reserved before the call, so it is refused before anything is charged."""


def media_images(value: Any) -> int:
    """Images anywhere in a request part, tool results included; raises UnpricedContent for
    a document or file the request names but does not carry. (No recursion: a body is as
    deep as the client made it.)"""
    images = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            kind = item.get("type")
            if kind in _IMAGES:
                images += 1
            elif kind in ("document", "file") and _by_reference(item):
                raise UnpricedContent(f"A {kind} sent by URL or id cannot be priced before "
                                      "the call; send its content inline.")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return images


def _by_reference(part: Mapping[str, Any]) -> bool:
    source = part.get("source")                       # Anthropic: url, file (id), base64, text
    if isinstance(source, Mapping):
        return source.get("type") in ("url", "file")
    file = part.get("file")                           # OpenAI: file_id or inline file_data
    return isinstance(file, Mapping) and "file_data" not in file


def estimate_input_tokens(messages: Iterable[Mapping[str, Any]], system: Any = None,
                          image_tokens: int = IMAGE_TOKENS) -> int:
    """Estimated prompt tokens of a chat request (OpenAI or Anthropic message shape): text at
    ~3 bytes a token, and each image at ``image_tokens`` on top of its bytes. Raises
    UnpricedContent for a document or file named by URL or id."""
    total = estimate_tokens(_content_text(system)) if system else 0
    images = media_images(system) if system else 0
    for message in messages:
        content = message.get("content")
        total += TOKENS_PER_MESSAGE + estimate_tokens(_content_text(content))
        if isinstance(content, list):
            images += media_images(content)
    return total + images * image_tokens
