"""/v1/chat/completions and /v1/messages under gunicorn, driven by the real openai and
anthropic clients, with the local fake provider upstream.

One gunicorn, one fake and a handful of keys serve the whole module (starting them is most of
the cost); each test that counts tokens first resets its user's layers in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import redis
from flask import Flask

from app import create_app
from fakeprovider import FakeProvider
from limiting import Decision
from limiting.core.decision import LayerState
from limiting.core.layers import Layer
from limiting.core.lease import KeepAlive
from limiting.core.llm import estimate_input_tokens
from limiting.core.provider_headers import (
    anthropic_headers,
    openai_duration,
    openai_headers,
    rfc3339_after,
)
from tests.conftest import ROOT, keyed_app
from tests.policies import LOADED, loaded_toml, plan, policy, served_by

USERS = {"alice": "roomy", "tiny": "tiny", "meter": "metered", "solo": "single"}
POLICY = policy(
    store=LOADED, per_ip="100000 per 10 seconds", default="roomy",
    plans={"roomy": plan(500, 50, "10000 per day", tokens_per_minute=100000,
                         default_max_tokens=50),
           "tiny": plan(2, 0.01),
           "metered": plan(500, 50, tokens_per_minute=1000, input_tokens_per_minute=800,
                           output_tokens_per_minute=500),
           "single": plan(500, 50, max_concurrent=1, tokens_per_minute=100000)},
    users=USERS,
    models={"gpt-4o-mini": served_by("openai", requests_per_minute=100000),
            "claude-3-5-haiku-latest": served_by("anthropic", requests_per_minute=100000),
            "gpt-saturated": served_by("openai", requests_per_minute=1),
            "claude-saturated": served_by("anthropic", requests_per_minute=1),
            # Names the fake provider answers with an error status.
            **{f"{name}-err-{status}": served_by(provider) for status in (429, 529, 500)
               for name, provider in (("gpt", "openai"), ("claude", "anthropic"))}})
HELLO = [{"role": "user", "content": "hello big world"}]   # fake/echo: 3 + 4 prompt, 4 reply
GPT, CLAUDE = "gpt-4o-mini", "claude-3-5-haiku-latest"


@dataclass
class Stack:
    url: str
    fp: FakeProvider
    keys: dict[str, str]
    env: dict[str, str]
    app: Flask
    clients: list[openai.OpenAI | anthropic.Anthropic] = field(default_factory=list)

    def oai(self, user: str = "alice", key: str | None = None) -> openai.OpenAI:
        client = openai.OpenAI(base_url=self.url + "/v1", api_key=key or self.keys[user],
                               max_retries=0)
        self.clients.append(client)
        return client

    def ant(self, user: str = "alice", key: str | None = None) -> anthropic.Anthropic:
        client = anthropic.Anthropic(base_url=self.url, api_key=key or self.keys[user],
                                     max_retries=0)
        self.clients.append(client)
        return client

    def left(self, user: str) -> dict[str, int]:
        """Remaining per layer, read in-process (charges nothing)."""
        limiter = self.app.extensions["llm_limiter"]
        plan = limiter.policy.plans[USERS[user]]
        return {s.layer.name: s.remaining for s in limiter.engine.peek(user, plan).states}

    def reset(self, user: str) -> None:
        self.app.extensions["llm_limiter"].engine.reset(user)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    redis.Redis.from_url(redis_url).flushall()
    folder = tmp_path_factory.mktemp("v1")
    policy = folder / "limits.toml"
    policy.write_text(POLICY)
    env = {"REDIS_URL": redis_url, "LIMITS_CONFIG": str(policy)}
    with keyed_app(folder, env, USERS, workers=2) as (server, fp, keys):
        stack = Stack(server.url, fp, keys, env, create_app(dict(env)))
        try:
            yield stack
        finally:
            for client in stack.clients:    # idle keep-alives would hold up the shutdown
                client.close()


@pytest.fixture
def s(stack: Stack) -> Stack:
    stack.fp.reset()
    return stack


# --- happy paths ----------------------------------------------------------------------------------


def test_openai_echo_plain_and_streamed(s: Stack) -> None:
    raw = s.oai().chat.completions.with_raw_response.create(model="echo", messages=HELLO)
    reply = raw.parse()
    assert reply.choices[0].message.content == "echo: hello big world"
    assert reply.usage is not None and (reply.usage.prompt_tokens,
                                        reply.usage.completion_tokens) == (7, 4)
    assert raw.headers["x-ratelimit-limit-requests"] == "500"
    assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
    cut = s.oai().chat.completions.create(model="echo", messages=HELLO, max_tokens=2)
    assert cut.choices[0].message.content == "echo: hello"
    assert cut.choices[0].finish_reason == "length"

    chunks = list(s.oai().chat.completions.create(model="echo", messages=HELLO, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "echo: hello big world"
    assert all(c.usage is None for c in chunks)          # not asked for: not sent
    chunks = list(s.oai().chat.completions.create(
        model="echo", messages=HELLO, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 11


def test_anthropic_echo_plain_and_streamed(s: Stack) -> None:
    raw = s.ant().messages.with_raw_response.create(model="echo", max_tokens=20, messages=HELLO)
    message = raw.parse()
    assert message.content[0].text == "echo: hello big world"  # type: ignore[union-attr]
    assert (message.usage.input_tokens, message.usage.output_tokens) == (7, 4)
    assert message.stop_reason == "end_turn"
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "500"
    with s.ant().messages.stream(model="echo", max_tokens=3, messages=HELLO) as stream:
        assert "".join(stream.text_stream) == "echo: hello big"
        final = stream.get_final_message()
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 3


def test_openai_via_provider_plain_and_streamed_with_headers(s: Stack) -> None:
    raw = s.oai().chat.completions.with_raw_response.create(model=GPT, messages=HELLO)
    assert raw.parse().choices[0].message.content == "echo: hello big world"
    # No max tokens given: the plan's default is reserved and sent, so output stays within it.
    assert s.fp.requests[-1].body["max_completion_tokens"] == 50
    for name in ("requests", "tokens"):
        assert int(raw.headers[f"x-ratelimit-remaining-{name}"]) >= 0
        reset = raw.headers[f"x-ratelimit-reset-{name}"]
        assert reset.endswith("s") and reset[0].isdigit()
    assert "ratelimit-policy" in raw.headers and "x-ratelimit-limit" in raw.headers

    raw = s.oai().chat.completions.with_raw_response.create(
        model=GPT, messages=HELLO, stream=True, max_tokens=3)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
    assert raw.headers["x-accel-buffering"] == "no"
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hello big"
    assert all(c.usage is None for c in chunks)
    upstream = s.fp.requests[-1].body
    assert upstream["stream_options"] == {"include_usage": True} and upstream["max_tokens"] == 3


def test_anthropic_via_provider_plain_and_streamed_with_headers(s: Stack) -> None:
    raw = s.ant().messages.with_raw_response.create(model=CLAUDE, max_tokens=9, messages=HELLO,
                                                    system="be brief")
    assert raw.parse().content[0].text == "echo: hello big world"  # type: ignore[union-attr]
    assert s.fp.requests[-1].body["system"] == "be brief"
    reset = raw.headers["anthropic-ratelimit-tokens-reset"]
    assert datetime.strptime(reset, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) > \
        datetime.now(UTC)
    assert raw.headers["anthropic-ratelimit-tokens-limit"] == "100000"
    assert raw.headers["anthropic-ratelimit-input-tokens-limit"] == "100000"

    raw = s.ant().messages.with_raw_response.create(model=CLAUDE, max_tokens=9, messages=HELLO,
                                                    stream=True)
    assert "anthropic-ratelimit-requests-remaining" in raw.headers
    events = list(raw.parse())
    assert [e.type for e in events][:2] == ["message_start", "content_block_start"]
    assert events[-1].type == "message_stop"
    # Raw SSE: every event passes through under its own name, ping included.
    with httpx.stream("POST", s.url + "/v1/messages", headers={"x-api-key": s.keys["alice"]},
                      json={"model": CLAUDE, "max_tokens": 9, "messages": HELLO,
                            "stream": True}) as r:
        names = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


# --- what the token layers settle -----------------------------------------------------------------


def test_streams_settle_actual_usage(s: Stack) -> None:
    s.reset("meter")
    list(s.oai("meter").chat.completions.create(model=GPT, messages=HELLO, stream=True,
                                                max_tokens=100))
    # Reserved its estimate + 100, settled to what the provider reported: 7 in + 4 out.
    show = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "limits", "show",
                           "meter"], cwd=ROOT, env={**os.environ, **s.env}, capture_output=True,
                          text=True, timeout=60)
    rows = {line.split()[0]: line.split()[1:] for line in show.stdout.splitlines()[2:]}
    assert rows["tokens-minute"][:2] == ["1000", str(1000 - 11)]
    assert rows["input-tokens-minute"][1] == str(800 - 7)
    assert rows["output-tokens-minute"][1] == str(500 - 4)

    s.reset("meter")
    with s.ant("meter").messages.stream(model=CLAUDE, max_tokens=100, messages=HELLO) as stream:
        stream.until_done()
    assert s.left("meter")["tokens-minute"] == 1000 - 11
    s.reset("meter")
    list(s.ant("meter").messages.create(model="echo", max_tokens=100, messages=HELLO,
                                        stream=True))
    # The next request's RateLimit header shows it too (minus that request's own reservation).
    raw = s.oai("meter").chat.completions.with_raw_response.create(model="echo", messages=HELLO,
                                                                    max_tokens=5)
    reserved = estimate_input_tokens(HELLO, model="echo") + 5   # never below the bill: bytes
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(1000 - 11 - reserved)


def test_cached_prompt_tokens_are_not_charged_as_input(s: Stack) -> None:
    s.reset("meter")
    s.fp.set_cached_tokens(5)
    s.oai("meter").chat.completions.create(model=GPT, messages=HELLO, max_tokens=10)
    left = s.left("meter")
    assert left["input-tokens-minute"] == 800 - 2 and left["tokens-minute"] == 1000 - 6


@pytest.mark.parametrize("endpoint", ["openai", "anthropic"])
def test_upstream_dying_mid_stream_is_charged_as_reserved(s: Stack, endpoint: str) -> None:
    s.reset("meter")
    s.fp.disconnect_mid_stream()
    if endpoint == "openai":
        with pytest.raises(openai.APIError, match=r"ended|failed|upstream"):
            list(s.oai("meter").chat.completions.create(model=GPT, messages=HELLO, stream=True,
                                                        max_tokens=100))
        used_in = estimate_input_tokens(HELLO)   # no usage came: our estimate
    else:
        with pytest.raises(anthropic.APIStatusError):
            list(s.ant("meter").messages.create(model=CLAUDE, max_tokens=100, messages=HELLO,
                                                stream=True))
        used_in = 7                              # message_start told us
    # Not the one word that got out: the provider may have generated up to max_tokens.
    assert s.left("meter")["tokens-minute"] == 1000 - used_in - 100


def test_client_gone_mid_stream_frees_its_lease(s: Stack) -> None:
    # A second a chunk: the stream is still upstream (holding the lease) while the test makes
    # its second call, however long a loaded box takes to (at 0.1 s a chunk it could be over).
    s.fp.set_chunk_delay(1.0)
    words = [{"role": "user", "content": " ".join(["word"] * 60)}]
    with httpx.stream("POST", s.url + "/v1/chat/completions",
                      headers={"authorization": f"Bearer {s.keys['solo']}"},
                      json={"model": GPT, "messages": words, "stream": True}) as r:
        assert r.status_code == 200
        next(r.iter_lines())
        with pytest.raises(openai.RateLimitError) as busy:   # max_concurrent = 1
            s.oai("solo").chat.completions.create(model="echo", messages=HELLO)
        assert "concurrent" in busy.value.response.json()["error"]["message"]
    # The worker notices at its next write, then settles: a loaded box's bound, well under the
    # 60 s lease TTL (so a lease not given back still shows).
    deadline = time.monotonic() + 30
    while True:
        try:
            s.oai("solo").chat.completions.create(model="echo", messages=HELLO)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the lease was not given back"
            time.sleep(0.1)


@pytest.mark.parametrize("endpoint", ["openai", "anthropic"])
def test_client_gone_mid_stream_is_charged_as_reserved(s: Stack, endpoint: str) -> None:
    """A real hang-up under gunicorn: not the deltas that got out, the whole reservation."""
    s.reset("solo")
    s.fp.set_chunk_delay(0.1)
    words = [{"role": "user", "content": " ".join(["word"] * 60)}]
    if endpoint == "openai":
        path, auth = "/v1/chat/completions", {"authorization": f"Bearer {s.keys['solo']}"}
        model, used_in = GPT, estimate_input_tokens(words)
    else:
        path, auth = "/v1/messages", {"x-api-key": s.keys["solo"]}
        model, used_in = CLAUDE, 60 + 4        # message_start reported the prompt
    with httpx.stream("POST", s.url + path, headers=auth,
                      json={"model": model, "messages": words, "stream": True,
                            "max_tokens": 100}) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    # The worker notices at its next write, then finishes: a loaded box's bound, well under
    # the 60 s lease TTL (so a lease not given back still shows).
    deadline = time.monotonic() + 30
    while s.left("solo")["concurrent"] == 0:
        assert time.monotonic() < deadline, "the lease was not given back"
        time.sleep(0.1)
    assert s.left("solo")["tokens-minute"] == 100000 - used_in - 100


# --- refusals -------------------------------------------------------------------------------------


def test_401_in_each_shape(s: Stack) -> None:
    with pytest.raises(openai.AuthenticationError) as o:
        s.oai(key="llm_" + "x" * 43).chat.completions.create(model="echo", messages=HELLO)
    assert o.value.response.json()["error"]["code"] == "invalid_api_key"
    assert o.value.response.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.AuthenticationError) as a:
        s.ant(key="nope").messages.create(model="echo", max_tokens=5, messages=HELLO)
    assert a.value.response.json() == {"type": "error", "error": {
        "type": "authentication_error", "message": "Incorrect or revoked API key provided."}}
    bare = httpx.post(s.url + "/v1/chat/completions", json={"model": "echo", "messages": HELLO})
    assert bare.status_code == 401 and bare.json()["error"]["param"] is None
    # x-api-key works as well as Bearer on /v1/messages
    ok = httpx.post(s.url + "/v1/messages", headers={"x-api-key": s.keys["alice"]},
                    json={"model": "echo", "max_tokens": 5, "messages": HELLO})
    assert ok.status_code == 200 and ok.json()["content"][0]["text"] == "echo: hello big world"


def test_400_in_each_shape(s: Stack) -> None:
    oai = s.oai()
    for kwargs, param in [({"messages": []}, "messages"), ({"max_tokens": 0}, "max_tokens"),
                          ({"n": 2}, "n"), ({"extra_body": {"bogus": 1}}, "bogus"),
                          ({"stream_options": {"include_usage": True}}, "stream_options")]:
        args = {"model": "echo", "messages": HELLO, **kwargs}
        with pytest.raises(openai.BadRequestError) as bad:
            oai.chat.completions.create(**args)  # type: ignore[call-overload]
        err = bad.value.response.json()["error"]
        assert (err["type"], err["code"], err["param"]) == (
            "invalid_request_error", "invalid_request", param), err
    auth = {"authorization": f"Bearer {s.keys['alice']}"}
    r = httpx.post(s.url + "/v1/chat/completions", content=b"{nope", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(s.url + "/v1/chat/completions", headers=auth,
                   json={"model": "echo", "messages": HELLO, "stream": "yes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    r = httpx.post(s.url + "/v1/chat/completions", headers=auth,
                   json={"model": "echo", "messages": [{"role": "user", "content": 5}]})
    assert r.json()["error"]["param"] == "messages[0].content"
    with pytest.raises(openai.NotFoundError) as missing:
        oai.chat.completions.create(model="no-such-model", messages=HELLO)
    assert missing.value.response.json()["error"]["code"] == "model_not_found"

    r = httpx.post(s.url + "/v1/messages", headers=auth, json={"model": "echo", "messages": HELLO})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]
    r = httpx.post(s.url + "/v1/messages", headers=auth, content=b"[1,")
    assert r.status_code == 400 and r.json()["type"] == "error"
    r = httpx.post(s.url + "/v1/messages", headers=auth, content=b"x" * (1024 * 1024 + 1))
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    with pytest.raises(anthropic.BadRequestError):
        s.ant().messages.create(model="echo", max_tokens=5, messages=[])


def test_429_in_each_shape(s: Stack) -> None:
    oai, ant = s.oai("tiny"), s.ant("tiny")
    s.reset("tiny")
    oai.chat.completions.create(model="echo", messages=HELLO)
    ant.messages.create(model="echo", max_tokens=5, messages=HELLO)
    with pytest.raises(openai.RateLimitError) as o:
        oai.chat.completions.create(model="echo", messages=HELLO)
    error = o.value.response.json()["error"]
    assert error | {"message": "", "resets_in_seconds": 0} == {
        "message": "", "type": "requests", "param": None, "code": "rate_limit_exceeded",
        # Beside the SDK's fields, what refused and its numbers: tiny is a bucket of 2.
        "layer": "user", "limit": 2, "window_seconds": 200, "unit": "requests",
        "remaining": 0, "resets_in_seconds": 0}
    assert 1 <= error["resets_in_seconds"] <= 200
    retry = int(o.value.response.headers["retry-after"])
    assert 50 <= retry <= 101
    assert o.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(anthropic.RateLimitError) as a:
        ant.messages.create(model="echo", max_tokens=5, messages=HELLO)
    ant_error = a.value.response.json()["error"]
    assert ant_error["type"] == "rate_limit_error" and ant_error["layer"] == "user"
    assert (ant_error["limit"], ant_error["remaining"]) == (2, 0)
    assert int(a.value.response.headers["retry-after"]) >= 1
    assert a.value.response.headers["anthropic-ratelimit-requests-remaining"] == "0"


def test_upstream_saturated_is_429_not_the_callers_fault(s: Stack) -> None:
    s.oai().chat.completions.create(model="gpt-saturated", messages=HELLO)
    with pytest.raises(openai.RateLimitError) as o:
        s.oai().chat.completions.create(model="gpt-saturated", messages=HELLO)
    err = o.value.response.json()["error"]
    assert (err["type"], err["code"]) == ("server_error", "upstream_saturated")
    assert int(o.value.response.headers["retry-after"]) >= 1
    s.ant().messages.create(model="claude-saturated", max_tokens=5, messages=HELLO)
    with pytest.raises(anthropic.RateLimitError) as a:
        s.ant().messages.create(model="claude-saturated", max_tokens=5, messages=HELLO)
    assert "saturated" in a.value.response.json()["error"]["message"]


@pytest.mark.parametrize(("status", "http", "code", "kind"), [
    (429, 503, "upstream_rate_limited", "overloaded_error"),
    (529, 503, "upstream_overloaded", "overloaded_error"),
    (500, 502, "upstream_error", "api_error"),
])
def test_upstream_errors_map_to_clear_errors(s: Stack, status: int, http: int, code: str,
                                             kind: str) -> None:
    # A model per case: a provider 429/529 teaches that model's guard to hold back.
    s.fp.fail_next(status, retry_after=4 if status != 500 else None)
    with pytest.raises(openai.APIStatusError) as o:
        s.oai().chat.completions.create(model=f"gpt-err-{status}", messages=HELLO)
    assert o.value.status_code == http
    assert o.value.response.json()["error"] | {"message": ""} == {
        "message": "", "type": "server_error", "param": None, "code": code}
    if http == 503:
        assert o.value.response.headers["retry-after"] == "4"
    s.fp.fail_next(status)
    with pytest.raises(anthropic.APIStatusError) as a:
        s.ant().messages.create(model=f"claude-err-{status}", max_tokens=5, messages=HELLO,
                                stream=True)
    assert a.value.status_code == http and a.value.response.json()["error"]["type"] == kind


def test_upstream_refusal_gives_every_unit_back_and_a_500_keeps_them(s: Stack) -> None:
    s.reset("meter")
    s.fp.fail_next(400)          # refused before generation: certainly not billed
    with pytest.raises(openai.BadRequestError):
        s.oai("meter").chat.completions.create(model=GPT, messages=HELLO, max_tokens=100,
                                               stream=True)
    assert s.left("meter")["tokens-minute"] == 1000
    s.fp.fail_next(500)          # the provider may have generated: charged as reserved
    with pytest.raises(openai.InternalServerError):
        s.oai("meter").chat.completions.create(model=GPT, messages=HELLO, max_tokens=100,
                                               stream=True)
    assert s.left("meter")["tokens-minute"] == 1000 - estimate_input_tokens(HELLO) - 100


# --- the pure header helpers ----------------------------------------------------------------------


UNITS = {"tokens-minute": "tokens", "input-tokens-minute": "input_tokens",
         "output-tokens-minute": "output_tokens", "usd-day": "usd_micros"}


def _decision(*states: tuple[str, float, int, float]) -> Decision:
    """Layers as compile_plan names them, each with the unit it counts."""
    return Decision(True, tuple(LayerState(Layer(name, "w", name, limit, 60e6, 60, "fail_open",
                                                 UNITS.get(name, "requests")),
                                           remaining, reset)
                                for name, limit, remaining, reset in states))


def test_provider_header_formats() -> None:
    assert [openai_duration(x) for x in (0, 0.012, 1, 1.5, 360, 3725)] == \
        ["0s", "12ms", "1s", "1.5s", "6m0s", "1h2m5s"]
    assert rfc3339_after(1.2, 1_700_000_000.0) == "2023-11-14T22:13:22Z"
    d = _decision(("user", 10, 7, 3.0), ("quota-day", 100, 5, 80000.0),
                  ("input-tokens-minute", 800, 700, 60.0), ("output-tokens-minute", 500, 90, 30))
    o = openai_headers(d)
    assert (o["x-ratelimit-limit-requests"], o["x-ratelimit-remaining-requests"]) == ("100", "5")
    assert o["x-ratelimit-reset-requests"] == "22h13m20s"
    assert o["x-ratelimit-limit-tokens"] == "800"          # no tokens-minute: input's
    a = anthropic_headers(d, 0.0)
    assert a["anthropic-ratelimit-tokens-remaining"] == "90"   # the tighter of input/output
    assert a["anthropic-ratelimit-output-tokens-reset"] == "1970-01-01T00:00:30Z"
    assert "x-ratelimit-limit-tokens" not in openai_headers(_decision(("user", 1, 1, 0)))


def test_edge_refusal_of_bad_requests_speaks_each_dialect(tmp_path: Path,
                                                          redis_url: str) -> None:
    url = redis_url + "/3"          # its own database: the module's keys stay in db 0
    redis.Redis.from_url(url).flushdb()
    policy = tmp_path / "edge.toml"
    policy.write_text(loaded_toml() + '[edge]\nper_ip = ["2 per minute"]\n'
                      '[plans.starter]\nburst = 5\nrefill_per_second = 1\n')
    client = create_app({"REDIS_URL": url, "LIMITS_CONFIG": str(policy)}).test_client()
    for _ in range(2):
        assert client.post("/v1/chat/completions", json={}).status_code == 401
    refused = client.post("/v1/chat/completions", json={})
    assert refused.status_code == 429 and refused.json is not None
    assert refused.json["error"]["code"] == "rate_limit_exceeded"
    refused = client.post("/v1/messages", data=json.dumps({}))
    assert refused.status_code == 429 and refused.json is not None
    assert refused.json["error"]["type"] == "rate_limit_error"


def test_keepalive_renews_until_stopped() -> None:
    class Lease:
        renewals = 0

        def renew(self) -> None:
            self.renewals += 1

    lease = Lease()
    keepalive = KeepAlive(lease, every=0.02).start()  # type: ignore[arg-type]
    deadline = time.monotonic() + 30    # a loaded box's bound: usually 0.06 s
    while lease.renewals < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    keepalive.stop()
    time.sleep(0.05)
    stopped_at = lease.renewals
    time.sleep(0.1)
    assert lease.renewals == stopped_at
