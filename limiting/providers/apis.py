"""The two provider APIs a model is called through, each as one object: its upstream call, its
usage reader, its reply text, and ``echo`` answering in its wire format. /v1's dialects and
/chat call models only through these, so there is one way to call a provider."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from limiting.core.llm import Usage

from . import echo_llm, llm_calls
from .errors import Observe, UpstreamError
from .llm_calls import UpstreamReply, UpstreamStream
from .request import LLMRequest

EchoAnswer = Callable[[str, echo_llm.EchoReply], UpstreamReply]
EchoStream = Callable[[str, echo_llm.EchoReply], UpstreamStream]


@dataclass(frozen=True, slots=True)
class ProviderAPI:
    """One provider's chat API (OpenAI Chat Completions, Anthropic Messages)."""

    name: str                                  # the provider whose SDK speaks it
    usage: Callable[[Any], Usage | None]       # a body's or event's usage, as the limiter's
    text: Callable[[Any], str]                 # a whole answer's reply text
    echo_answer: EchoAnswer
    echo_stream: EchoStream

    def answer(self, call: LLMRequest, observe: Observe) -> UpstreamReply:
        """The whole answer to ``call``: upstream, or made in-process for ``echo``."""
        if call.provider == "echo":
            return self.echo_answer(call.model, _echo(call))
        return llm_calls.create(self.name, call.params, observe, call.tokens)

    def open(self, call: LLMRequest, observe: Observe) -> UpstreamStream:
        """The answer to ``call`` as a stream; returns once its headers are known."""
        if call.provider == "echo":
            return self.echo_stream(call.model, _echo(call))
        return llm_calls.stream(self.name, call.params, observe, call.tokens)

    def complete(self, call: LLMRequest, observe: Observe) -> tuple[str, Usage | None]:
        """The reply text and the usage the provider reported (None: no report), for /chat."""
        if call.provider == "echo":
            # The same words and counts as echo's JSON answer, without writing and re-reading
            # it: /chat on echo is the benchmark's hot path.
            reply = _echo(call)
            return reply.text, Usage(reply.prompt_tokens, reply.completion_tokens)
        answer = self.answer(call, observe)
        try:
            data = answer.json()
        except ValueError:
            raise UpstreamError(502, "upstream_error",
                                f"The {self.name} API sent an unreadable answer.") from None
        return self.text(data), self.usage(data)


def _echo(call: LLMRequest) -> echo_llm.EchoReply:
    return echo_llm.reply(call.messages, call.max_output, call.system)


def _openai_text(data: Any) -> str:
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise UpstreamError(502, "upstream_error", "The openai API returned no choices.")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""


def _anthropic_text(data: Any) -> str:
    blocks = data.get("content") if isinstance(data, dict) else None
    return "".join(block["text"] for block in blocks or ()
                   if isinstance(block, dict) and block.get("type") == "text"
                   and isinstance(block.get("text"), str))


OPENAI = ProviderAPI("openai", llm_calls.openai_usage, _openai_text,
                  echo_llm.openai_completion, echo_llm.openai_stream)
ANTHROPIC = ProviderAPI("anthropic", llm_calls.anthropic_usage, _anthropic_text,
                     echo_llm.anthropic_message, echo_llm.anthropic_stream)


def api_for(provider: str) -> ProviderAPI:
    """The API a model of ``provider`` is called through (``echo`` answers as OpenAI does)."""
    return ANTHROPIC if provider == "anthropic" else OPENAI
