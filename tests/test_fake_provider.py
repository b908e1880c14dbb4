"""The fake provider against the real openai and anthropic SDKs (sync clients)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import anthropic
import httpx
import httpx2
import openai
import pytest

from fakeprovider import Bill, FakeProvider, MeterReading, format_duration, parse_duration

ROOT = Path(__file__).resolve().parents[1]
USER = [{"role": "user", "content": "hello big world"}]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeProvider]:
    with FakeProvider() as fp:
        yield fp


@pytest.fixture
def fp(server: FakeProvider) -> FakeProvider:
    assert server.quiesce(10)  # a stream the last test abandoned must not bill into this one
    server.reset()
    return server


@pytest.fixture
def oai(fp: FakeProvider) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fp.url + "/v1", api_key="sk-test", max_retries=0) as client:
        yield client


@pytest.fixture
def ant(fp: FakeProvider) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=fp.url, api_key="sk-ant-test", max_retries=0) as client:
        yield client


# --- OpenAI ---------------------------------------------------------------------------------------


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


# --- Anthropic ------------------------------------------------------------------------------------


def test_anthropic_plain_reply_and_usage(fp: FakeProvider, ant: anthropic.Anthropic) -> None:
    m = ant.messages.create(model="claude-x", max_tokens=100, system="be terse", messages=USER)  # type: ignore[arg-type]
    assert m.type == "message" and m.role == "assistant" and m.model == "claude-x"
    assert m.content[0].type == "text" and m.content[0].text == "echo: hello big world"
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    assert (m.usage.input_tokens, m.usage.output_tokens) == (7 + 2, 4)
    assert m.usage.cache_read_input_tokens == 0 and m.usage.cache_creation_input_tokens == 0
    req = fp.requests[-1]
    assert req.path == "/v1/messages" and req.body["system"] == "be terse"
    assert "anthropic-version" in req.headers
    m = ant.messages.create(model="claude-x", max_tokens=2, messages=USER)  # type: ignore[arg-type]
    assert m.content[0].text == "echo: hello" and m.stop_reason == "max_tokens"  # type: ignore[union-attr]


def test_anthropic_x_api_key_and_missing_key(fp: FakeProvider) -> None:
    body = {"model": "c", "max_tokens": 5, "messages": USER}
    ok = httpx.post(fp.url + "/v1/messages", json=body, headers={"x-api-key": "k"})
    assert ok.status_code == 200 and ok.json()["content"][0]["text"] == "echo: hello big world"
    bad = httpx.post(
        fp.url + "/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"}
    )
    assert bad.status_code == 401
    assert bad.json()["type"] == "error" and bad.json()["error"]["type"] == "authentication_error"
    assert bad.headers["request-id"].startswith("req_")
    with (
        anthropic.Anthropic(
            base_url=fp.url,
            api_key="k",
            max_retries=0,
            default_headers={"Authorization": anthropic.Omit()},
        ) as client,
        pytest.raises(anthropic.AuthenticationError),
    ):
        client.messages.create(model="c", max_tokens=5, messages=USER)  # type: ignore[arg-type]


def test_anthropic_stream_helper_final_message(fp: FakeProvider, ant: anthropic.Anthropic) -> None:
    fp.set_cached_tokens(3, 2)
    with ant.messages.stream(
        model="claude-x", max_tokens=100, system="be terse", messages=USER
    ) as stream:  # type: ignore[arg-type]
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert pieces == ["echo:", " hello", " big", " world"]
    assert final.content[0].text == "echo: hello big world"  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (9 - 3 - 2, 4)
    assert (final.usage.cache_read_input_tokens, final.usage.cache_creation_input_tokens) == (3, 2)
    assert fp.requests[-1].body["stream"] is True


def test_anthropic_raw_event_stream(fp: FakeProvider, ant: anthropic.Anthropic) -> None:
    fp.set_chunk_delay(0.01)
    events = list(ant.messages.create(model="c", max_tokens=3, messages=USER, stream=True))  # type: ignore[arg-type]
    kinds = [e.type for e in events]
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]  # ping is consumed by the SDK
    start = events[0]
    assert start.type == "message_start" and start.message.usage.input_tokens == 7
    assert start.message.usage.output_tokens == 1
    delta = events[-2]
    assert delta.type == "message_delta" and delta.delta.stop_reason == "max_tokens"
    assert delta.usage.output_tokens == 3


def test_anthropic_sse_wire_format(fp: FakeProvider) -> None:
    body = {"model": "c", "max_tokens": 5, "messages": USER, "stream": True}
    with httpx.stream("POST", fp.url + "/v1/messages", json=body, headers={"x-api-key": "k"}) as r:
        text = r.read().decode()
    blocks = [b for b in text.split("\n\n") if b]
    names = [b.split("\n")[0].removeprefix("event: ") for b in blocks]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    for block in blocks:
        name, data = block.split("\n")
        assert json.loads(data.removeprefix("data: "))["type"] == name.removeprefix("event: ")


def test_anthropic_errors(fp: FakeProvider, ant: anthropic.Anthropic) -> None:
    fp.fail_next(429, retry_after=3)
    with pytest.raises(anthropic.RateLimitError) as rl:
        ant.messages.create(model="c", max_tokens=5, messages=USER)  # type: ignore[arg-type]
    assert rl.value.response.headers["retry-after"] == "3"
    assert rl.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    fp.fail_next(529)
    with pytest.raises(anthropic.InternalServerError) as ov:  # OverloadedError where the SDK has it
        ant.messages.create(model="c", max_tokens=5, messages=USER)  # type: ignore[arg-type]
    assert ov.value.status_code == 529
    assert ov.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
        "request_id": ov.value.response.headers["request-id"],
    }
    fp.fail_next(500)
    with pytest.raises(anthropic.InternalServerError) as ise:
        ant.messages.create(model="c", max_tokens=5, messages=USER)  # type: ignore[arg-type]
    assert ise.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    fp.fail_next(400)
    with pytest.raises(anthropic.BadRequestError):
        ant.messages.create(model="c", max_tokens=5, messages=USER)  # type: ignore[arg-type]


def test_anthropic_bad_input(fp: FakeProvider) -> None:
    headers = {"x-api-key": "k", "content-type": "application/json"}
    r = httpx.post(fp.url + "/v1/messages", content=b"[1,", headers=headers)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(fp.url + "/v1/messages", json={"model": "c", "max_tokens": 5}, headers=headers)
    assert r.status_code == 400 and r.json()["type"] == "error"
    r = httpx.post(fp.url + "/v1/messages", json={"model": "c", "messages": USER}, headers=headers)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]


def test_anthropic_raw_headers(ant: anthropic.Anthropic) -> None:
    raw = ant.messages.with_raw_response.create(model="c", max_tokens=9, messages=USER)  # type: ignore[arg-type]
    h = raw.headers
    assert h["request-id"].startswith("req_")
    for kind in ("requests", "tokens", "input-tokens", "output-tokens"):
        assert int(h[f"anthropic-ratelimit-{kind}-limit"]) > 0
        assert int(h[f"anthropic-ratelimit-{kind}-remaining"]) >= 0
        reset = datetime.fromisoformat(
            h[f"anthropic-ratelimit-{kind}-reset"].replace("Z", "+00:00")
        )
        assert reset.tzinfo is not None
        assert -1 <= (reset - datetime.now(UTC)).total_seconds() <= 61
    assert int(h["anthropic-ratelimit-requests-remaining"]) == 9_999
    assert int(h["anthropic-ratelimit-input-tokens-remaining"]) == 2_000_000 - 7
    assert int(h["anthropic-ratelimit-output-tokens-remaining"]) == 2_000_000 - 4


def test_anthropic_disconnect_mid_stream(fp: FakeProvider, ant: anthropic.Anthropic) -> None:
    fp.disconnect_mid_stream()
    pieces: list[str] = []
    # anthropic 2.x lets the transport error (httpx2) escape mid-stream; older SDKs wrap it.
    with (
        pytest.raises((anthropic.APIConnectionError, httpx2.TransportError)),
        ant.messages.stream(model="c", max_tokens=50, messages=USER) as stream,  # type: ignore[arg-type]
    ):
        pieces.extend(stream.text_stream)
    assert pieces == ["echo:"]


# --- HTTP surface, concurrency, CLI ---------------------------------------------------------------


def test_unknown_path_and_method(fp: FakeProvider) -> None:
    r = httpx.post(fp.url + "/v1/embeddings", json={})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    r = httpx.get(fp.url + "/v1/messages", headers={"x-api-key": "k"})
    assert r.status_code == 405 and r.json()["type"] == "error"
    assert [q.path for q in fp.requests] == ["/v1/embeddings", "/v1/messages"]


def test_duration_format() -> None:
    cases = {
        0: "0s",
        0.012: "12ms",
        1: "1s",
        8.64: "8.64s",
        90.5: "1m30.5s",
        360: "6m0s",
        3600: "1h0m0s",
    }
    for seconds, text in cases.items():
        assert format_duration(seconds) == text
        assert parse_duration(text) == pytest.approx(seconds)


def test_300_concurrent_requests(fp: FakeProvider) -> None:
    fp.set_delay(0.5)
    body = {"model": "m", "messages": USER}

    async def run() -> list[int]:
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
        async with httpx.AsyncClient(
            limits=limits, timeout=30, headers={"authorization": "Bearer k"}
        ) as client:

            async def one() -> int:
                r = await client.post(fp.url + "/v1/chat/completions", json=body)
                return r.status_code

            return await asyncio.gather(*(one() for _ in range(300)))

    started = time.monotonic()
    statuses = asyncio.run(run())
    elapsed = time.monotonic() - started
    assert statuses == [200] * 300
    assert elapsed < 20, elapsed


def test_cli_serves_and_exits_cleanly_on_sigterm() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fakeprovider", "--port", "0", "--delay", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.removeprefix("listening on ")
        r = httpx.post(
            url + "/v1/messages",
            json={"model": "c", "max_tokens": 5, "messages": USER},
            headers={"x-api-key": "k"},
        )
        assert r.status_code == 200 and r.json()["content"][0]["text"] == "echo: hello big world"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stdout.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- the bill meter -------------------------------------------------------------------------------

LONG = [{"role": "user", "content": " ".join(f"w{i}" for i in range(40))}]  # reply: 41 tokens
LONG_PROMPT = 40 + 4
PRICES = {
    "gpt-4o": {"input": 2.5, "output": 10.0, "cached_input": 1.25},
    "claude-x": {"input": 3.0, "output": 15.0, "cached_input": 0.3, "cache_write": 3.75},
}


def billed(m: Bill) -> tuple[int, int, int, int, int]:
    """(fresh input, cache reads, cache writes, output, requests) of a meter reading."""
    return (
        m.input_tokens,
        m.cached_input_tokens,
        m.cache_write_tokens,
        m.output_tokens,
        m.requests_billed,
    )


def test_meter_plain_calls_are_their_usage(
    fp: FakeProvider, oai: openai.OpenAI, ant: anthropic.Anthropic
) -> None:
    fp.set_cached_tokens(5, 1)  # OpenAI reports no cache writes; Anthropic does
    r = oai.chat.completions.create(model="gpt-4o", messages=USER)  # type: ignore[arg-type]
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    cached = r.usage.prompt_tokens_details.cached_tokens or 0
    # billed before the reply is written: a client that read it sees it metered, no quiesce
    m = fp.meter()
    assert billed(m) == (r.usage.prompt_tokens - cached, cached, 0, r.usage.completion_tokens, 1)
    assert m.prompt_tokens == r.usage.prompt_tokens and m.usd == 0.0  # no prices: free
    a = ant.messages.create(model="claude-x", max_tokens=100, system="be terse", messages=USER)  # type: ignore[arg-type]
    u = a.usage
    m = fp.meter()
    assert billed(m.by_model["claude-x"]) == (
        u.input_tokens,
        u.cache_read_input_tokens,
        u.cache_creation_input_tokens,
        u.output_tokens,
        1,
    )
    assert set(m.by_model) == {"gpt-4o", "claude-x"} and m.requests_billed == 2
    assert set(m.by_key) == {"sk-test", "sk-ant-test"}
    assert m.by_key["sk-test"] == m.by_model["gpt-4o"]
    assert m.output_tokens == r.usage.completion_tokens + u.output_tokens


def test_meter_streams_read_to_the_end_are_their_usage(
    fp: FakeProvider, oai: openai.OpenAI, ant: anthropic.Anthropic
) -> None:
    fp.set_chunk_delay(0.002)
    chunks = list(
        oai.chat.completions.create(
            model="gpt-4o",
            messages=LONG,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None
    assert fp.quiesce(10)
    assert billed(fp.meter()) == (usage.prompt_tokens, 0, 0, usage.completion_tokens, 1)
    fp.reset_meter()
    fp.set_cached_tokens(3, 2)
    with ant.messages.stream(model="claude-x", max_tokens=100, messages=LONG) as stream:  # type: ignore[arg-type]
        final = stream.get_final_message()
    u = final.usage
    assert fp.quiesce(10)
    assert billed(fp.meter()) == (
        u.input_tokens,
        u.cache_read_input_tokens,
        u.cache_creation_input_tokens,
        u.output_tokens,
        1,
    )


def test_meter_grows_while_a_stream_is_generated(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.set_chunk_delay(0.05)  # 40 more words take >= 2 s after the first
    stream = oai.chat.completions.create(model="gpt-4o", messages=LONG, stream=True)  # type: ignore[arg-type]
    seen = 0
    for chunk in stream:
        seen += len((chunk.choices[0].delta.content or "").split())
        if seen:
            break
    assert not fp.quiesce(0)  # the server is still generating
    partial = fp.meter()
    assert partial.prompt_tokens == LONG_PROMPT and 1 <= partial.output_tokens < 41
    seen += sum(len((c.choices[0].delta.content or "").split()) for c in stream)
    assert seen == 41 and fp.quiesce(10)
    assert fp.meter().output_tokens == 41


def test_meter_stream_closed_after_the_first_chunk(
    fp: FakeProvider, oai: openai.OpenAI, ant: anthropic.Anthropic
) -> None:
    fp.set_chunk_delay(0.01)
    visible = ""
    stream = oai.chat.completions.create(model="gpt-4o", messages=LONG, stream=True)  # type: ignore[arg-type]
    for chunk in stream:
        visible += chunk.choices[0].delta.content or ""
        if visible:
            break
    stream.close()
    with ant.messages.stream(model="claude-x", max_tokens=100, messages=LONG) as astream:  # type: ignore[arg-type]
        first = next(iter(astream.text_stream))
    assert fp.quiesce(10)
    m = fp.meter()
    # billed: whatever was generated before the server saw the hang-up, never less than was read
    for model, text in (("gpt-4o", visible), ("claude-x", first)):
        part = m.by_model[model]
        assert text == "echo:" and part.prompt_tokens == LONG_PROMPT and part.requests_billed == 1
        assert len(text.split()) <= part.output_tokens <= 41


def test_meter_stream_the_fake_breaks(
    fp: FakeProvider, oai: openai.OpenAI, ant: anthropic.Anthropic
) -> None:
    fp.disconnect_mid_stream(2)
    with pytest.raises(openai.APIConnectionError):
        list(oai.chat.completions.create(model="gpt-4o", messages=LONG, stream=True))  # type: ignore[arg-type]
    with (
        pytest.raises((anthropic.APIConnectionError, httpx2.TransportError)),
        ant.messages.stream(model="claude-x", max_tokens=100, messages=LONG) as stream,  # type: ignore[arg-type]
    ):
        list(stream.text_stream)
    assert fp.quiesce(10)
    for model in ("gpt-4o", "claude-x"):  # it produced one word, then broke
        assert billed(fp.meter().by_model[model]) == (LONG_PROMPT, 0, 0, 1, 1)


def test_meter_client_timeout_is_billed_in_full(fp: FakeProvider) -> None:
    fp.set_delay(0.6)
    with (
        openai.OpenAI(
            base_url=fp.url + "/v1", api_key="k", max_retries=0, timeout=0.2
        ) as oai_short,
        pytest.raises(openai.APITimeoutError),
    ):
        oai_short.chat.completions.create(model="gpt-4o", messages=LONG)  # type: ignore[arg-type]
    with (
        anthropic.Anthropic(base_url=fp.url, api_key="k", max_retries=0, timeout=0.2) as ant_short,
        pytest.raises((anthropic.APITimeoutError, httpx2.TimeoutException)),
        ant_short.messages.stream(model="claude-x", max_tokens=100, messages=LONG) as stream,  # type: ignore[arg-type]
    ):
        list(stream.text_stream)
    assert fp.quiesce(10)
    for model in ("gpt-4o", "claude-x"):  # the provider finished both replies nobody read
        assert billed(fp.meter().by_model[model]) == (LONG_PROMPT, 0, 0, 41, 1)


def test_meter_bills_no_refusal(
    fp: FakeProvider, oai: openai.OpenAI, ant: anthropic.Anthropic
) -> None:
    for status in (429, 500, 529):
        fp.fail_next(status)
        with pytest.raises(openai.APIStatusError):
            oai.chat.completions.create(model="gpt-4o", messages=USER)  # type: ignore[arg-type]
        fp.fail_next(status)
        with pytest.raises(anthropic.APIStatusError):
            ant.messages.create(model="claude-x", max_tokens=5, messages=USER, stream=True)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="gpt-4o", messages=[])
    auth = {"authorization": "Bearer k"}
    assert httpx.post(fp.url + "/v1/chat/completions", json=USER, headers=auth).status_code == 400
    body = {"model": "c", "max_tokens": 5, "messages": USER}
    assert httpx.post(fp.url + "/v1/messages", json=body).status_code == 401
    assert httpx.post(fp.url + "/v1/embeddings", json=body, headers=auth).status_code == 404
    assert httpx.get(fp.url + "/v1/messages", headers=auth).status_code == 405
    fp.set_limits(rpm=1)
    oai.chat.completions.create(model="gpt-4o", messages=USER)  # type: ignore[arg-type]
    for _ in range(2):
        with pytest.raises(openai.RateLimitError):
            oai.chat.completions.create(model="gpt-4o", messages=USER)  # type: ignore[arg-type]
    assert fp.quiesce(10)
    m = fp.meter()
    assert billed(m) == (7, 0, 0, 4, 1)  # the one admitted call, nothing else
    assert set(m.by_model) == {"gpt-4o"} and set(m.by_key) == {"sk-test"}


def test_meter_prices(fp: FakeProvider, oai: openai.OpenAI, ant: anthropic.Anthropic) -> None:
    fp.set_prices(PRICES)
    fp.set_cached_tokens(3, 2)
    oai.chat.completions.create(model="gpt-4o", messages=LONG)  # type: ignore[arg-type]
    ant.messages.create(model="claude-x", max_tokens=100, messages=LONG)  # type: ignore[arg-type]
    list(ant.messages.create(model="claude-x", max_tokens=5, messages=USER, stream=True))  # type: ignore[arg-type]
    oai.chat.completions.create(model="unpriced", messages=LONG)  # type: ignore[arg-type]
    assert fp.quiesce(10)
    m = fp.meter()
    gpt = (41 * 2.5 + 3 * 1.25 + 41 * 10.0) / 1e6  # OpenAI: 3 cache reads, no writes
    claude = (39 * 3.0 + 3 * 0.3 + 2 * 3.75 + 41 * 15.0) / 1e6 + (
        2 * 3.0 + 3 * 0.3 + 2 * 3.75 + 4 * 15.0
    ) / 1e6
    assert m.by_model["gpt-4o"].usd == pytest.approx(gpt)
    assert m.by_model["claude-x"].usd == pytest.approx(claude)
    assert m.by_model["unpriced"].usd == 0.0 and m.by_model["unpriced"].output_tokens == 41
    assert m.usd == pytest.approx(gpt + claude) and m.requests_billed == 4
    assert m.by_key["sk-test"].usd == pytest.approx(gpt)
    fp.reset()  # back to the constructor's (no) prices, and a zero meter
    assert fp.meter() == MeterReading()
    oai.chat.completions.create(model="gpt-4o", messages=USER)  # type: ignore[arg-type]
    assert fp.meter().usd == 0.0 and fp.meter().output_tokens == 4


def test_meter_prices_validated_and_constructor_prices() -> None:
    for bad in ({"m": {"input": -1}}, {"m": {"input": float("nan")}}, {"m": {"outptu": 1}}):
        with pytest.raises(ValueError):
            FakeProvider(prices=bad)
    with FakeProvider(prices={"m": {"input": 1_000_000}}) as fp:
        with pytest.raises(ValueError):
            fp.set_prices({"m": {"output": "1"}})  # type: ignore[dict-item]
        fp.set_cached_tokens(2)
        with openai.OpenAI(base_url=fp.url + "/v1", api_key="a", max_retries=0) as client:
            client.chat.completions.create(model="m", messages=USER)  # type: ignore[arg-type]
        # a missing cached_input price is the input price: $1 per token, 7 prompt tokens
        assert fp.meter().usd == pytest.approx(7.0)
        fp.reset_meter()
        assert fp.meter().requests_billed == 0
        with openai.OpenAI(base_url=fp.url + "/v1", api_key="b", max_retries=0) as client:
            client.chat.completions.create(model="m", messages=USER)  # type: ignore[arg-type]
        assert fp.meter().by_key["b"].usd == pytest.approx(7.0)
