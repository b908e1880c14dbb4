"""The input reservation of one chat request: every part the provider renders into the prompt
and bills as input, counted so that the count is never below the bill.

Counted as text: every string and number in every message (content, tool calls' names and
arguments, tool results, names and ids) and the system prompt. Counted as JSON: the tool,
function and response-format definitions whole (their keys are the parameter names the
provider renders) and Anthropic's tool-use inputs, each at the larger of its two renderings:
non-ASCII as is, or escaped (``\\u4e00``, six characters for one; a provider that renders
JSON with Python's defaults bills those).
Priced apart: each image at the model's ``image_tokens``, each PDF page at
``PDF_PAGE_TEXT_TOKENS`` plus ``image_tokens``, and what the provider adds around tools.
Text is counted by :mod:`limiting.core.tokenizer`. (No recursion: a body is as deep as the
client made it.)

Core module: no Flask or redis import.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .documents import PDF_PAGE_TEXT_TOKENS, document_pages
from .tokenizer import count_tokens, encoding_for

TOKENS_PER_MESSAGE = 8   # chat framing: OpenAI adds 3-4 a message, Anthropic its own turns
# Media the provider bills by what it decodes, not by the bytes we see: an image by URL is a
# hundred bytes and up to ~1,600 tokens (Anthropic's cap; gpt-4o's high detail ~1,445). Models
# that bill images as many more tokens (gpt-4o-mini) set their own ``image_tokens``.
IMAGE_TOKENS = 1600
_IMAGES = frozenset({"image", "image_url", "input_image"})
_DOCUMENTS = frozenset({"document", "file"})
# An image part's fields that carry the image (priced per image); any other field is text.
_IMAGE_FIELDS = frozenset({"image_url", "source", "image", "url", "file_id", "detail"})
# Content parts whose "input" is an object the provider renders back into the prompt as JSON.
_TOOL_USES = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})
# Any tool list: the tool-use system prompt Anthropic adds (313-346 tokens documented for the
# current models, 264 for Claude 3 Haiku) or OpenAI's wrapping of the definitions (tens);
# and per tool, its own wrapping.
TOOLS_TOKENS = 350
PER_TOOL_TOKENS = 16
# Anthropic's client tools come with a definition the provider writes and bills (documented:
# bash 245, text editor 700, computer use 735 plus a 466-499 token system prompt).
CLIENT_TOOL_TOKENS = (("bash_", 300), ("text_editor_", 800), ("computer_", 1300))


@dataclass
class Prompt:
    """What a request puts in the prompt, gathered before any of it is counted."""

    texts: list[str] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)   # rendered as JSON
    images: int = 0
    pages: int = 0
    fixed: int = 0

    def add(self, value: Any) -> None:
        """Every string and number in ``value``, and every key (a provider that renders an
        unexpected field bills it); images and documents priced apart."""
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                self.texts.append(item)
            elif isinstance(item, Mapping):
                self.texts.extend(k for k in item if isinstance(k, str))
                kind = item.get("type")
                if kind in _IMAGES:
                    self.images += 1           # its bytes are not what the provider bills
                    stack.extend(v for k, v in item.items() if k not in _IMAGE_FIELDS)
                elif kind in _DOCUMENTS:
                    pages, rest = document_pages(item)
                    self.pages += pages
                    stack.append(rest)
                elif kind in _TOOL_USES:
                    self.values.append(item.get("input"))
                    stack.extend(v for k, v in item.items() if k != "input")
                else:
                    stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
            elif isinstance(item, (int, float)) and not isinstance(item, bool):
                self.texts.append(repr(item))

    def add_tools(self, tools: Any) -> None:
        """Definitions whole (keys are rendered too), with what the provider adds to each."""
        if not tools:
            return
        listed = tools if isinstance(tools, list) else [tools]
        self.fixed += TOOLS_TOKENS + PER_TOOL_TOKENS * len(listed)
        for tool in listed:
            self.values.append(tool)
            kind = tool.get("type") if isinstance(tool, Mapping) else None
            if isinstance(kind, str):
                self.fixed += next((n for prefix, n in CLIENT_TOOL_TOKENS
                                    if kind.startswith(prefix)), 0)

    def tokens(self, model: str | None, image_tokens: int) -> int:
        encoding = encoding_for(model)
        return (count_tokens(self.texts, encoding) + self.fixed
                + sum(_json_tokens(value, encoding) for value in self.values)
                + self.images * image_tokens
                + self.pages * (PDF_PAGE_TEXT_TOKENS + image_tokens))


def _json_tokens(value: Any, encoding: str | None) -> int:
    """``value`` as JSON, never below either rendering: escaping changes only DEL and
    non-ASCII (``\\u007f``), so JSON without them is counted once."""
    plain = json.dumps(value, default=str, ensure_ascii=False)
    if plain.isascii() and "\x7f" not in plain:
        return count_tokens([plain], encoding)
    escaped = json.dumps(value, default=str)
    return max(count_tokens([plain], encoding), count_tokens([escaped], encoding))


def estimate_prompt(messages: Iterable[Mapping[str, Any]], system: Any = None, *,
                    model: str | None = None, image_tokens: int = IMAGE_TOKENS,
                    tools: Any = None, functions: Any = None, response_format: Any = None,
                    tool_choice: Any = None) -> int:
    """Input tokens to reserve for a chat request (OpenAI or Anthropic shape) to ``model``.
    Raises UnpricedContent for a document or file the limiter cannot price."""
    prompt = Prompt()
    count = 0
    for message in messages:
        count += 1
        prompt.add(message)
    prompt.fixed += count * TOKENS_PER_MESSAGE
    prompt.add(system)
    prompt.add_tools(tools)
    prompt.add_tools(functions)
    if response_format:
        prompt.values.append(response_format)
    prompt.add(tool_choice)
    return prompt.tokens(model, image_tokens)
