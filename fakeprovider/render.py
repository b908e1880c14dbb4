"""Billing the prompt as a provider does, when the fake is asked to (``tokenizer=True``).

The fake renders the conversation into one text, the way a chat template does, and counts it
with a real BPE tokenizer: GitHub's ``bpe-openai`` (an implementation apart from the tiktoken
the limiter counts with), o200k_base for every model (Anthropic's own is not public; a
limiter that counts Claude by bytes must still cover it). What a provider adds beyond text is
billed at the documented figures: a PDF page as its text and an image, each image, the tool-use
system prompt and Anthropic's client tools. Without bpe-openai installed, ``available()`` is
False and the fake keeps counting words.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from functools import lru_cache
from typing import Any

PER_MESSAGE = 4            # <|im_start|>role ... <|im_end|>
PAGE_TOKENS = 3000 + 1000  # Anthropic's densest documented page text, and the page's image
IMAGE_TOKENS = 1445        # gpt-4o's high-detail image at its largest
TOOLS_SYSTEM = 346         # Anthropic's tool-use system prompt (Claude 4, tool_choice auto)
CLIENT_TOOLS = (("bash_", 245), ("text_editor_", 700), ("computer_", 735 + 499))


@lru_cache(maxsize=1)
def _encoding() -> Any:
    try:
        import bpe_openai
    except ImportError:
        return None
    return bpe_openai.get_encoding("o200k_base")


def available() -> bool:
    """Whether a real tokenizer is installed to bill by."""
    return _encoding() is not None


def _pages(data: str) -> int:
    """Pages of a base64 PDF (data URL or bare); 0 for what cannot be read."""
    data = data.partition(",")[2] if data.startswith("data:") else data
    try:
        from pypdf import PdfReader
        return len(PdfReader(io.BytesIO(base64.b64decode(data)), strict=False).pages)
    except (ImportError, binascii.Error, ValueError, OSError):
        return 0
    except Exception:   # a broken PDF: a provider refuses it, billing nothing here
        return 0


class Rendering:
    """The prompt as one text, plus what is billed beside the text."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.extra = 0

    def content(self, content: Any) -> None:
        """A message's content or a tool result's: text, tool calls, media."""
        if isinstance(content, str):
            self.parts.append(content)
            return
        if not isinstance(content, list):
            return
        for part in content:
            if isinstance(part, str):
                self.parts.append(part)
            elif isinstance(part, dict):
                self.part(part)

    def part(self, part: dict[str, Any]) -> None:
        kind = part.get("type")
        if isinstance(part.get("text"), str):
            self.parts.append(part["text"])
        elif kind == "tool_use":
            self.parts.append(f"{part.get('name')}({json.dumps(part.get('input'))})")
        elif kind == "tool_result":
            self.content(part.get("content"))
        elif kind in ("image", "image_url", "input_image"):
            self.extra += IMAGE_TOKENS
        elif kind == "document":
            source = part.get("source") or {}
            if source.get("type") == "base64":
                self.extra += PAGE_TOKENS * _pages(str(source.get("data", "")))
            elif source.get("type") == "text":
                self.parts.append(str(source.get("data", "")))
            else:
                self.content(source.get("content"))
        elif kind == "file":
            self.extra += PAGE_TOKENS * _pages(str((part.get("file") or {}).get("file_data", "")))

    def message(self, message: dict[str, Any]) -> None:
        self.extra += PER_MESSAGE
        self.parts.append(str(message.get("role")))
        if isinstance(message.get("name"), str):
            self.parts.append(message["name"])
        self.content(message.get("content"))
        for call in message.get("tool_calls") or []:
            function = (call.get("function") or {}) if isinstance(call, dict) else {}
            self.parts.append(f"{function.get('name')}({function.get('arguments')})")

    def tools(self, tools: Any) -> None:
        if not isinstance(tools, list) or not tools:
            return
        self.extra += TOOLS_SYSTEM
        for tool in tools:
            self.parts.append(json.dumps(tool))
            kind = tool.get("type") if isinstance(tool, dict) else None
            if isinstance(kind, str):
                self.extra += next((n for p, n in CLIENT_TOOLS if kind.startswith(p)), 0)

    def tokens(self) -> int:
        from bpe_openai.errors import TokenLimitError
        try:
            text = len(_encoding().encode_ordinary("\n".join(self.parts)))
        except TokenLimitError as exc:   # past its chunk limit it still says the count
            text = exc.token_count
        return text + self.extra


def prompt_tokens(body: dict[str, Any]) -> int:
    """The prompt a provider bills for ``body`` (either API's shape)."""
    rendering = Rendering()
    system = body.get("system")
    if system is not None:
        rendering.content(system)
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            rendering.message(message)
    rendering.tools(body.get("tools"))
    rendering.tools(body.get("functions"))
    if body.get("response_format"):
        rendering.parts.append(json.dumps(body["response_format"]))
    return rendering.tokens()
