"""The provider APIs /v1 and /chat both call models through: echo answers /chat's way exactly as
its JSON answer says, and each API reads a reply's text and usage from the provider's body."""

from __future__ import annotations

from typing import Any

import pytest

from limiting import Usage
from limiting.providers import ANTHROPIC, OPENAI, LLMRequest, ProviderAPI, UpstreamError, api_for

MESSAGES = [{"role": "user", "content": "hello there general kenobi"}]


def echo_call(max_output: int, system: Any = None) -> LLMRequest:
    return LLMRequest("echo", "echo", MESSAGES, max_output, 10, {}, system=system)


@pytest.mark.parametrize("api", [OPENAI, ANTHROPIC], ids=["openai", "anthropic"])
@pytest.mark.parametrize("max_output", [2, 100])
def test_echo_completes_as_its_json_answer_says(api: ProviderAPI, max_output: int) -> None:
    """/chat's in-process echo shortcut never drifts from the answer /v1 relays."""
    system = "be brief" if api is ANTHROPIC else None
    call = echo_call(max_output, system)
    body = api.answer(call, lambda h, s, t: None).json()
    assert api.complete(call, lambda h, s, t: None) == (api.text(body), api.usage(body))


def test_each_provider_is_called_through_its_own_api() -> None:
    assert api_for("openai") is OPENAI
    assert api_for("anthropic") is ANTHROPIC
    assert api_for("echo") is OPENAI


def test_openai_reply_text() -> None:
    body = {"choices": [{"message": {"role": "assistant", "content": "hi"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1,
                      "prompt_tokens_details": {"cached_tokens": 2}}}
    assert OPENAI.text(body) == "hi"
    assert OPENAI.usage(body) == Usage(5, 1, 2)
    # A tool-calls-only answer has no content: an empty reply, not a failure.
    assert OPENAI.text({"choices": [{"message": {"content": None}}]}) == ""
    with pytest.raises(UpstreamError) as caught:
        OPENAI.text({"choices": []})
    assert caught.value.status == 502


def test_anthropic_reply_text_is_its_text_blocks() -> None:
    body = {"content": [{"type": "text", "text": "a"}, {"type": "tool_use", "id": "t"},
                        {"type": "text", "text": "b"}],
            "usage": {"input_tokens": 3, "cache_read_input_tokens": 4, "output_tokens": 2}}
    assert ANTHROPIC.text(body) == "ab"
    assert ANTHROPIC.usage(body) == Usage(7, 2, 4)
