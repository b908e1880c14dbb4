"""The fake provider's Anthropic API against the real anthropic SDK (sync client)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import anthropic
import httpx
import httpx2
import pytest

from fakeprovider import FakeProvider
from tests import fake_clients
from tests.fake_clients import USER

# The fake and its clients (tests/fake_clients.py), as fixtures of this module.
server, fp, oai, ant = fake_clients.server, fake_clients.fp, fake_clients.oai, fake_clients.ant


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
