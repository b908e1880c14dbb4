"""The fake provider's OpenAI API against the real openai SDK (sync client)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import anthropic
import httpx
import openai
import pytest

from fakeprovider import FakeProvider, parse_duration
from tests import fake_clients
from tests.fake_clients import USER

# The fake and its clients (tests/fake_clients.py), as fixtures of this module.
server, fp, oai, ant = fake_clients.server, fake_clients.fp, fake_clients.oai, fake_clients.ant


def test_openai_plain_reply_and_usage(fp: FakeProvider, oai: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "be very terse"}, *USER]
    r = oai.chat.completions.create(model="gpt-4o", messages=messages)  # type: ignore[arg-type]
    assert r.object == "chat.completion" and r.model == "gpt-4o" and r.system_fingerprint
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "echo: hello big world"
    assert choice.finish_reason == "stop" and choice.logprobs is None
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        3 + 4 + 3 + 4,
        4,
        18,
    )
    assert (
        r.usage.prompt_tokens_details is not None
        and r.usage.prompt_tokens_details.cached_tokens == 0
    )
    (req,) = fp.requests
    assert req.path == "/v1/chat/completions" and req.method == "POST"
    assert req.headers["authorization"] == "Bearer sk-test"
    assert req.body["messages"] == messages


def test_openai_truncation_and_content_parts(oai: openai.OpenAI) -> None:
    parts = [{"type": "text", "text": "one two"}, {"type": "text", "text": "three four"}]
    r = oai.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": parts}],  # type: ignore[list-item]
        max_completion_tokens=3,
    )
    assert r.choices[0].message.content == "echo: one two"
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (8, 3)
    r = oai.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=2)  # type: ignore[arg-type]
    assert r.choices[0].message.content == "echo: hello" and r.choices[0].finish_reason == "length"


def test_openai_stream_with_usage_chunk(fp: FakeProvider, oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="gpt-4o",
        messages=USER,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hello big world"
    assert (
        len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 4
    )  # one chunk per word
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        7,
        4,
        11,
    )
    assert all(c.usage is None for c in chunks[:-1])
    assert fp.requests[-1].body["stream_options"] == {"include_usage": True}
    assert fp.requests[-1].body["stream"] is True


def test_openai_stream_without_usage_and_chunked_raw(fp: FakeProvider) -> None:
    body = {"model": "m", "messages": USER, "stream": True, "max_tokens": 2}
    with httpx.stream(
        "POST", fp.url + "/v1/chat/completions", json=body, headers={"authorization": "Bearer k"}
    ) as r:
        assert r.headers["transfer-encoding"] == "chunked"
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all("usage" not in p for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


def test_openai_cached_tokens_knob(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.set_cached_tokens(5)
    r = oai.chat.completions.create(model="gpt-4o", messages=USER)  # type: ignore[arg-type]
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    assert (r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens) == (7, 5)
    fp.set_cached_tokens(100)  # clamped to the prompt
    r = oai.chat.completions.create(model="gpt-4o", messages=USER)  # type: ignore[arg-type]
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    assert r.usage.prompt_tokens_details.cached_tokens == 7


def test_openai_raw_response_ratelimit_headers(oai: openai.OpenAI) -> None:
    raw = oai.chat.completions.with_raw_response.create(model="gpt-4o", messages=USER)  # type: ignore[arg-type]
    h = raw.headers
    assert raw.parse().choices[0].message.content == "echo: hello big world"
    assert h["x-request-id"].startswith("req_")
    assert int(h["x-ratelimit-limit-requests"]) == 10_000
    assert int(h["x-ratelimit-limit-tokens"]) == 2_000_000
    assert int(h["x-ratelimit-remaining-requests"]) == 9_999
    assert int(h["x-ratelimit-remaining-tokens"]) == 2_000_000 - 11
    assert 0 < parse_duration(h["x-ratelimit-reset-requests"]) <= 60
    assert 0 < parse_duration(h["x-ratelimit-reset-tokens"]) <= 60
    raw2 = oai.chat.completions.with_raw_response.create(model="gpt-4o", messages=USER)  # type: ignore[arg-type]
    assert int(raw2.headers["x-ratelimit-remaining-requests"]) == 9_998


def test_ratelimit_header_overrides(
    fp: FakeProvider, oai: openai.OpenAI, ant: anthropic.Anthropic
) -> None:
    fp.set_ratelimit_headers(
        remaining_requests=3, remaining_tokens=50, reset_requests=90.5, reset_tokens=0.012
    )
    h = oai.chat.completions.with_raw_response.create(model="m", messages=USER).headers  # type: ignore[arg-type]
    assert h["x-ratelimit-remaining-requests"] == "3" and h["x-ratelimit-remaining-tokens"] == "50"
    assert h["x-ratelimit-reset-requests"] == "1m30.5s" and h["x-ratelimit-reset-tokens"] == "12ms"
    h = ant.messages.with_raw_response.create(model="c", max_tokens=9, messages=USER).headers  # type: ignore[arg-type]
    assert h["anthropic-ratelimit-requests-remaining"] == "3"
    assert h["anthropic-ratelimit-input-tokens-remaining"] == "50"
    reset = datetime.fromisoformat(h["anthropic-ratelimit-requests-reset"].replace("Z", "+00:00"))
    assert 89 <= (reset - datetime.now(UTC)).total_seconds() <= 92
    fp.set_ratelimit_headers()
    h = oai.chat.completions.with_raw_response.create(model="m", messages=USER).headers  # type: ignore[arg-type]
    assert int(h["x-ratelimit-remaining-requests"]) == 9_997


def test_openai_injected_errors(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.fail_next(429, retry_after=7, retry_after_ms=6500)
    with pytest.raises(openai.RateLimitError) as rl:
        oai.chat.completions.create(model="gpt-4o", messages=USER)  # type: ignore[arg-type]
    assert rl.value.response.headers["retry-after"] == "7"
    assert rl.value.response.headers["retry-after-ms"] == "6500"
    assert rl.value.code == "rate_limit_exceeded" and rl.value.type == "requests"
    fp.fail_next(500, count=2)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as ise:
            oai.chat.completions.create(model="gpt-4o", messages=USER)  # type: ignore[arg-type]
        assert ise.value.type == "server_error"
    fp.fail_next(529)
    with pytest.raises(openai.InternalServerError) as ov:
        oai.chat.completions.create(model="gpt-4o", messages=USER)  # type: ignore[arg-type]
    assert ov.value.status_code == 529
    fp.fail_next(400)
    with pytest.raises(openai.BadRequestError) as br:
        oai.chat.completions.create(model="gpt-4o", messages=USER)  # type: ignore[arg-type]
    assert br.value.type == "invalid_request_error"
    assert oai.chat.completions.create(model="gpt-4o", messages=USER).choices  # type: ignore[arg-type]


def test_openai_sdk_retries_injected_429(fp: FakeProvider) -> None:
    fp.fail_next(429, retry_after_ms=10)
    with openai.OpenAI(base_url=fp.url + "/v1", api_key="k", max_retries=2) as client:
        r = client.chat.completions.create(model="gpt-4o", messages=USER)  # type: ignore[arg-type]
    assert r.choices[0].message.content == "echo: hello big world"
    assert len(fp.requests) == 2 and fp.requests[1].headers["x-stainless-retry-count"] == "1"


def test_openai_auth_error(fp: FakeProvider) -> None:
    with (
        openai.OpenAI(
            base_url=fp.url + "/v1",
            api_key="k",
            max_retries=0,
            default_headers={"Authorization": ""},
        ) as client,
        pytest.raises(openai.AuthenticationError) as exc,
    ):
        client.chat.completions.create(model="gpt-4o", messages=USER)  # type: ignore[arg-type]
    assert exc.value.code == "invalid_api_key" and exc.value.type == "invalid_request_error"
    body = httpx.post(fp.url + "/v1/chat/completions", json={}).json()
    assert body == {
        "error": {
            "message": body["error"]["message"],
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }


def test_openai_bad_input(fp: FakeProvider, oai: openai.OpenAI) -> None:
    auth = {"authorization": "Bearer k", "content-type": "application/json"}
    r = httpx.post(fp.url + "/v1/chat/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(fp.url + "/v1/chat/completions", json={"model": "m"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="gpt-4o", messages=[])
    r = httpx.post(
        fp.url + "/v1/chat/completions",
        json={"model": "m", "messages": USER, "stream_options": {"include_usage": True}},
        headers=auth,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


def test_openai_disconnect_mid_stream(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.disconnect_mid_stream()
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in oai.chat.completions.create(model="gpt-4o", messages=USER, stream=True):  # type: ignore[arg-type]
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "echo:"
    # the next stream is whole again
    text = "".join(
        c.choices[0].delta.content or ""
        for c in oai.chat.completions.create(model="gpt-4o", messages=USER, stream=True)  # type: ignore[arg-type]
    )
    assert text == "echo: hello big world"


def test_own_rpm_limit_both_providers(
    fp: FakeProvider, oai: openai.OpenAI, ant: anthropic.Anthropic
) -> None:
    fp.set_limits(rpm=2)
    oai.chat.completions.create(model="m", messages=USER)  # type: ignore[arg-type]
    raw = ant.messages.with_raw_response.create(model="c", max_tokens=9, messages=USER)  # type: ignore[arg-type]
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "0"
    with pytest.raises(openai.RateLimitError) as o429:
        oai.chat.completions.create(model="m", messages=USER)  # type: ignore[arg-type]
    assert o429.value.type == "requests" and o429.value.code == "rate_limit_exceeded"
    assert 1 <= int(o429.value.response.headers["retry-after"]) <= 60
    assert 0 < int(o429.value.response.headers["retry-after-ms"]) <= 60_000
    with pytest.raises(anthropic.RateLimitError) as a429:
        ant.messages.create(model="c", max_tokens=9, messages=USER)  # type: ignore[arg-type]
    assert a429.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert 1 <= int(a429.value.response.headers["retry-after"]) <= 60


def test_own_tpm_limit(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.set_limits(tpm=25)  # each call costs 7 prompt + 4 completion = 11
    for _ in range(2):
        oai.chat.completions.create(model="m", messages=USER)  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError) as exc:
        oai.chat.completions.create(model="m", messages=USER)  # type: ignore[arg-type]
    assert exc.value.type == "tokens"
    assert exc.value.response.headers["x-ratelimit-remaining-tokens"] == "3"
