"""A local fake LLM provider speaking the real OpenAI and Anthropic HTTP protocols.

Tests use :class:`FakeProvider` in-process; the benchmark runs
``python -m fakeprovider``. Token counting is in :mod:`fakeprovider.tokens`.
"""

from __future__ import annotations

from .provider import FakeProvider
from .ratelimit import format_duration, parse_duration
from .state import RecordedRequest
from .tokens import count_words, prompt_tokens

__all__ = [
    "FakeProvider",
    "RecordedRequest",
    "count_words",
    "format_duration",
    "parse_duration",
    "prompt_tokens",
]
