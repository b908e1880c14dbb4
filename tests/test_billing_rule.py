"""What a reservation is charged, however the call ends (issue 9, items 3 and 4).

The rule: cancel (every unit back) only when the provider certainly did not bill — no
connection, a 4xx or overloaded refusal before generation, our own refusal. A timeout, a client
that hangs up, a broken stream, a 5xx or a missing usage report is charged as reserved; a
reported usage is charged as reported.

/v1 runs in-process (Flask's test client) against the real Valkey, the real openai/anthropic
SDKs and the fake provider: a test client that closes a streamed response runs the same
generator close a gunicorn worker runs when the client hangs up.
"""

from __future__ import annotations

import json
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from fakeprovider import FakeProvider
from limiting import RateLimited, RateLimiter
from limiting.core.ask import Ask
from limiting.core.decision import Decision
from limiting.core.lease import RENEW_EVERY, provider_billed
from limiting.core.llm import Usage, estimate_input_tokens
from limiting.core.policy import PolicyError, parse_policy
from limiting.core.pricing import usage_usd_micros
from limiting.providers import OPENAI, LLMRequest, clients
from limiting.providers.errors import UpstreamError, from_sdk
from limiting.reservation import Reservation
from limiting.stores.storage import open_store
from tests.conftest import free_port, provider_env, write_policy
from tests.policies import loaded_toml

POLICY = loaded_toml() + """
[defaults]
plan = "metered"

[plans.metered]
burst = 500
refill_per_second = 50
quotas = ["10000 per day"]
tokens_per_minute = 100000
budget_usd_per_day = 100
max_concurrent = 4

[plans.single]
burst = 500
refill_per_second = 50
max_concurrent = 1
lease_ttl_seconds = 10

[models."gpt-4o-mini"]
provider = "openai"
requests_per_minute = 100000
input_usd_per_million = 100
output_usd_per_million = 400

[models."claude-3-5-haiku-latest"]
provider = "anthropic"
requests_per_minute = 100000
input_usd_per_million = 100
output_usd_per_million = 400

# A provider 429 teaches a model's guard to hold back: those tests get models of their own.
[models."gpt-busy"]
provider = "openai"
input_usd_per_million = 100
output_usd_per_million = 400

[models."claude-busy"]
provider = "anthropic"
input_usd_per_million = 100
output_usd_per_million = 400
"""
GPT, CLAUDE = "gpt-4o-mini", "claude-3-5-haiku-latest"
HELLO = [{"role": "user", "content": "hello big world"}]   # the fake: 7 prompt, 4 reply
LONG = [{"role": "user", "content": " ".join(["word"] * 60)}]
MAX = 100
TOKENS, USD = 100000, 100 * 10**6


@pytest.fixture
def fp(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProvider]:
    yield from provider_env(monkeypatch, upstream_timeout="1")  # type: ignore[misc]


@pytest.fixture
def app(tmp_path: Path, r: redis.Redis, redis_url: str, fp: FakeProvider) -> Flask:
    return create_app({"REDIS_URL": redis_url, "LIMITS_CONFIG": write_policy(tmp_path, POLICY)})



@pytest.fixture
def key(app: Flask) -> str:
    return limiter_of(app).keys.create("meter", "metered")[0]


def limiter_of(app: Flask) -> RateLimiter:
    return app.extensions["llm_limiter"]  # type: ignore[no-any-return]


def left(app: Flask, user: str = "meter", plan: str = "metered") -> dict[str, int]:
    limiter = limiter_of(app)
    states = limiter.engine.peek(user, limiter.policy.plans[plan]).states
    return {s.layer.name: s.remaining for s in states}


def reserved_usd(model: str, inputs: int, output: int) -> int:
    return round(usage_usd_micros(parse_policy(tomllib.loads(POLICY)).models[model],
                                  Usage(inputs, output)))


def assert_charged(app: Flask, model: str, inputs: int, output: int) -> None:
    """The token and dollar windows hold exactly this call; its lease is gone."""
    now = left(app)
    assert now["tokens-minute"] == TOKENS - inputs - output, now
    assert now["usd-day"] == USD - reserved_usd(model, inputs, output), now
    assert now["concurrent"] == 4, "the lease was not released"
    assert now["quota-day"] == 9999


def assert_cancelled(app: Flask) -> None:
    now = left(app)
    assert (now["tokens-minute"], now["usd-day"], now["concurrent"]) == (TOKENS, USD, 4), now
    assert now["quota-day"] == 9999          # the request itself still counts


def post(client: FlaskClient, key: str, endpoint: str, model: str, messages: list[Any],
         stream: bool = False) -> Any:
    if endpoint == "openai":
        return client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"model": model, "messages": messages, "max_tokens": MAX,
                                 "stream": stream}, buffered=not stream)
    return client.post("/v1/messages", headers={"x-api-key": key},
                       json={"model": model, "messages": messages, "max_tokens": MAX,
                             "stream": stream}, buffered=not stream)


def model_of(endpoint: str, busy: bool = False) -> str:
    if endpoint == "openai":
        return "gpt-busy" if busy else GPT
    return "claude-busy" if busy else CLAUDE


BOTH = pytest.mark.parametrize("endpoint", ["openai", "anthropic"])


# --- charged as reserved ------------------------------------------------------------------------


@BOTH
def test_upstream_timeout_is_charged_as_reserved(app: Flask, client: FlaskClient, key: str,
                                                 fp: FakeProvider, endpoint: str) -> None:
    fp.set_delay(2)    # UPSTREAM_TIMEOUT is 1 s: the provider got the request and is working
    resp = post(client, key, endpoint, model_of(endpoint), HELLO)
    assert resp.status_code == 504
    assert_charged(app, model_of(endpoint), estimate_input_tokens(HELLO), MAX)


@BOTH
def test_upstream_500_is_charged_as_reserved(app: Flask, client: FlaskClient, key: str,
                                             fp: FakeProvider, endpoint: str) -> None:
    fp.fail_next(500)
    assert post(client, key, endpoint, model_of(endpoint), HELLO).status_code == 502
    assert_charged(app, model_of(endpoint), estimate_input_tokens(HELLO), MAX)


def reported_input(endpoint: str, messages: list[Any]) -> int:
    """What the stream said about the prompt before it ended: Anthropic's message_start
    reports it; OpenAI reports nothing until the final usage chunk."""
    return estimate_input_tokens(messages) if endpoint == "openai" else \
        len(messages[0]["content"].split()) + 4


@BOTH
def test_client_hanging_up_after_the_first_chunk_is_charged_as_reserved(
        app: Flask, client: FlaskClient, key: str, fp: FakeProvider, endpoint: str) -> None:
    fp.set_chunk_delay(0.01)
    resp = post(client, key, endpoint, model_of(endpoint), LONG, stream=True)
    assert resp.status_code == 200
    chunks = iter(resp.response)
    first = next(chunks)
    assert first
    resp.close()       # the client is gone: the generator closes, as under gunicorn
    assert_charged(app, model_of(endpoint), reported_input(endpoint, LONG), MAX)


@BOTH
def test_stream_broken_by_the_provider_is_charged_as_reserved(
        app: Flask, client: FlaskClient, key: str, fp: FakeProvider, endpoint: str) -> None:
    fp.disconnect_mid_stream()
    resp = post(client, key, endpoint, model_of(endpoint), HELLO, stream=True)
    body = resp.get_data(as_text=True)
    assert "error" in body
    assert_charged(app, model_of(endpoint), reported_input(endpoint, HELLO), MAX)


# --- cancelled: the provider certainly did not bill ---------------------------------------------


@BOTH
@pytest.mark.parametrize("status", [400, 429, 529])
def test_refusals_before_generation_are_cancelled(app: Flask, client: FlaskClient, key: str,
                                                  fp: FakeProvider, endpoint: str,
                                                  status: int) -> None:
    fp.fail_next(status)
    resp = post(client, key, endpoint, model_of(endpoint, busy=True), HELLO)
    assert resp.status_code in (400, 503)
    assert_cancelled(app)


@BOTH
def test_stream_refused_before_it_opened_is_cancelled(app: Flask, client: FlaskClient, key: str,
                                                      fp: FakeProvider, endpoint: str) -> None:
    fp.fail_next(400)
    resp = post(client, key, endpoint, model_of(endpoint), HELLO, stream=True)
    assert resp.status_code == 400
    assert_cancelled(app)


@BOTH
def test_connection_refused_is_cancelled(app: Flask, client: FlaskClient, key: str,
                                         monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("OPENAI_BASE_URL", closed + "/v1")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", closed)
    clients.reset()
    resp = post(client, key, endpoint, model_of(endpoint), HELLO)
    assert resp.status_code == 502
    assert_cancelled(app)


# --- charged as the provider reported -----------------------------------------------------------


@BOTH
@pytest.mark.parametrize("stream", [False, True])
def test_reported_usage_is_what_is_charged(app: Flask, client: FlaskClient, key: str,
                                           endpoint: str, stream: bool) -> None:
    resp = post(client, key, endpoint, model_of(endpoint), HELLO, stream=stream)
    assert resp.status_code == 200
    resp.get_data()
    resp.close()
    assert_charged(app, model_of(endpoint), 7, 4)


# --- the lease lives as long as the call --------------------------------------------------------


def test_a_long_call_keeps_its_lease_through_the_library_api(
        tmp_path: Path, r: redis.Redis, redis_url: str, fp: FakeProvider,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A /chat-shaped view: ``with limiter.reserve(...) as r`` around a provider call. The
    call outlives lease_ttl_seconds (10 s); the lease is renewed, so a second call is refused
    while it runs, and it is released after."""
    monkeypatch.setenv("UPSTREAM_TIMEOUT", "30")
    clients.reset()
    app = Flask(__name__)
    app.config.update(REDIS_URL=redis_url, LIMITS_CONFIG=write_policy(tmp_path, POLICY))
    limiter = RateLimiter(app)

    @app.post("/slow")
    def slow() -> dict[str, Any]:
        with limiter.reserve("long", GPT, 10, 20, "single") as res:
            messages = [{"role": "user", "content": "hello there"}]
            call = LLMRequest(GPT, "openai", messages, 20, 10,
                              {"model": GPT, "messages": messages, "max_tokens": 20})
            text, usage = OPENAI.complete(call, lambda h, s, t: None)
            assert usage is not None
            res.settle(usage)
        return {"reply": text}

    fp.set_delay(12)
    results: list[int] = []
    call = threading.Thread(target=lambda: results.append(app.test_client().post("/slow")
                                                          .status_code))
    began = time.monotonic()
    call.start()
    deadline = time.monotonic() + 30    # a loaded box's bound
    while not fp.requests:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(10.5)   # past the lease's TTL: only a renewal keeps it
    try:
        with app.test_request_context():
            limiter.reserve("long", GPT, 1, 1, "single")
        held = False
    except RateLimited as exc:
        assert "concurrent" in str(exc)
        held = True
    # Held: the renewed lease. Not held is honest only if the call had already come back (the
    # fake answers 12 s after it arrived, after ``began``): a stalled machine, not a lost lease.
    assert held or time.monotonic() - began >= 12, "the lease was lost before the call ended"
    call.join(timeout=30)
    assert results == [200]
    assert left(app, "long", "single")["concurrent"] == 1


# --- the library API in a plain Flask app -------------------------------------------------------


@pytest.fixture
def lib(tmp_path: Path, r: redis.Redis, redis_url: str) -> Iterator[RateLimiter]:
    app = Flask(__name__)
    app.config.update(REDIS_URL=redis_url, LIMITS_CONFIG=write_policy(tmp_path, POLICY))
    limiter = RateLimiter(app)
    with app.test_request_context():
        yield limiter


def lib_left(limiter: RateLimiter) -> dict[str, int]:
    states = limiter.engine.peek("lib", limiter.policy.plans["metered"]).states
    return {s.layer.name: s.remaining for s in states}


def test_library_exit_without_settle_charges_as_reserved(lib: RateLimiter) -> None:
    with lib.reserve("lib", GPT, 30, 50) as res:
        assert lib_left(lib)["concurrent"] == 3
    assert res.done
    now = lib_left(lib)
    assert (now["tokens-minute"], now["concurrent"]) == (TOKENS - 80, 4)
    assert now["usd-day"] == USD - reserved_usd(GPT, 30, 50)


def test_library_exception_applies_the_rule(lib: RateLimiter) -> None:
    with pytest.raises(TimeoutError), lib.reserve("lib", GPT, 30, 50):
        raise TimeoutError("the upstream did not answer")        # may have billed: charged
    assert lib_left(lib)["tokens-minute"] == TOKENS - 80
    with pytest.raises(UpstreamError), lib.reserve("lib", GPT, 30, 50):
        raise UpstreamError(400, "upstream_rejected", "no", billed=False)   # cancelled
    assert lib_left(lib)["tokens-minute"] == TOKENS - 80
    with pytest.raises(GeneratorExit), lib.reserve("lib", GPT, 30, 50):
        raise GeneratorExit                                     # client gone: charged
    assert lib_left(lib)["tokens-minute"] == TOKENS - 160
    assert lib_left(lib)["concurrent"] == 4


def test_library_settles_exactly_once(lib: RateLimiter) -> None:
    with lib.reserve("lib", GPT, 30, 50) as res:
        res.settle(Usage(10, 5))
        res.settle(Usage(20, 20))
        res.cancel()
    assert lib_left(lib)["tokens-minute"] == TOKENS - 15
    # Racing finishers (keep-alive, a generator's finally, call_on_close): one wins.
    res2 = lib.reserve("lib", GPT, 30, 50)
    barrier = threading.Barrier(8)

    def race(i: int) -> None:
        barrier.wait()
        res2.settle(Usage(1, 1)) if i % 2 else res2.cancel()

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert lib_left(lib)["tokens-minute"] in (TOKENS - 15, TOKENS - 17)


def test_charge_reserved_takes_a_reported_input(lib: RateLimiter) -> None:
    res = lib.reserve("lib", GPT, 30, 50)
    res.charge_reserved(input_tokens=12)
    assert lib_left(lib)["tokens-minute"] == TOKENS - 62


# --- the rule on real SDK exceptions ------------------------------------------------------------


def _request() -> httpx.Request:
    return httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")


def _raised(outer: Exception, cause: BaseException) -> Exception:
    try:
        raise outer from cause
    except Exception as exc:
        return exc


@pytest.mark.parametrize(("make", "billed"), [
    (lambda: _raised(openai.APIConnectionError(request=_request()),
                     httpx.ConnectError("refused")), False),
    (lambda: _raised(anthropic.APIConnectionError(request=_request()),
                     httpx.ConnectError("name or service not known")), False),
    (lambda: _raised(openai.APIConnectionError(request=_request()),
                     httpx.RemoteProtocolError("peer closed")), True),
    (lambda: _raised(openai.APITimeoutError(request=_request()),
                     httpx.ReadTimeout("slow")), True),
    (lambda: httpx.ReadError("reset"), True),
    (lambda: GeneratorExit(), True),
    (lambda: ConnectionRefusedError(), False),
])
def test_provider_billed_on_transport_errors(make: Any, billed: bool) -> None:
    exc = make()
    assert provider_billed(exc) is billed
    if isinstance(exc, Exception):
        assert from_sdk(exc, "openai").billed is billed


@pytest.mark.parametrize(("status", "billed"), [
    (400, False), (401, False), (404, False), (413, False), (429, False), (503, False),
    (529, False), (500, True), (502, True), (504, True),
])
def test_provider_billed_on_status_errors(status: int, billed: bool) -> None:
    response = httpx.Response(status, request=_request(), json={"error": {"message": "x"}})
    exc = openai.APIStatusError("x", response=response, body=None)
    assert provider_billed(exc) is billed
    assert from_sdk(exc, "openai").billed is billed


def test_check_config_refuses_a_lease_shorter_than_two_renewals() -> None:
    plan = {"burst": 1, "refill_per_second": 1, "max_concurrent": 1}
    with pytest.raises(PolicyError, match=r"plans\.p\.lease_ttl_seconds: must be at least 10"):
        parse_policy({"plans": {"p": {**plan, "lease_ttl_seconds": 9}}}, "limits.toml")
    assert parse_policy({"plans": {"p": {**plan, "lease_ttl_seconds": int(2 * RENEW_EVERY)}}}) \
        .plans["p"].lease_ttl_seconds == 10


def test_a_reservation_holding_nothing_finishes_quietly(redis_url: str) -> None:
    """A fail-open reservation holds nothing: no keep-alive starts, finishing touches no key."""
    store = open_store(redis_url, timeout=2.0)
    res = Reservation(store, Decision(True, ()), Ask("echo", None, 10, 10))
    with res:
        pass
    assert res.done
    store.close()



# --- never sent, never billed (issue 19, item 8) ------------------------------------------------


def _deep_body(endpoint: str, depth: int, stream: bool) -> str:
    """A well-formed body with one passthrough field nested ``depth`` arrays deep."""
    field = "metadata"   # forwarded, not priced: only the SDK walks it
    shape = {"model": model_of(endpoint), "messages": HELLO, "max_tokens": MAX,
             "stream": stream, field: {"x": "DEEP"}}
    return json.dumps(shape).replace('"DEEP"', "[" * depth + "]" * depth)


@BOTH
@pytest.mark.parametrize("stream", [False, True])
def test_a_body_the_sdk_cannot_send_is_cancelled(app: Flask, client: FlaskClient, key: str,
                                                 fp: FakeProvider, endpoint: str,
                                                 stream: bool) -> None:
    """Nested just shallower than Flask parses (deeper is the 400 "not valid JSON") and
    deeper than the SDK can serialise: the call fails before its request leaves, so the
    provider got nothing and the reservation is cancelled (was: a 502 charged as
    reserved). The depth where that happens depends on the stack, so it is searched for."""
    url = "/v1/messages" if endpoint == "anthropic" else "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {key}"}
    for depth in range(1000, 700, -1):
        resp = client.post(url, headers=headers, data=_deep_body(endpoint, depth, stream),
                           content_type="application/json")
        if b"not valid JSON" not in resp.get_data():
            break
    else:
        pytest.fail("no depth got past the body's parser")
    assert fp.requests == [], "the provider must not have been reached"
    assert resp.status_code == 400, resp.get_data()
    assert "nested too deeply" in resp.get_data(as_text=True)
    assert_cancelled(app)


def test_a_schema_too_deep_to_price_is_a_400_before_any_charge(
        app: Flask, client: FlaskClient, key: str, fp: FakeProvider) -> None:
    """The input estimate walks response_format; nested deeper than it can, that is the
    caller's 400 before anything is charged, never a 500."""
    headers = {"Authorization": f"Bearer {key}"}
    for depth in range(1000, 700, -1):
        body = _deep_body("openai", depth, False).replace('"metadata"', '"response_format"')
        resp = client.post("/v1/chat/completions", headers=headers, data=body,
                           content_type="application/json")
        if b"not valid JSON" not in resp.get_data():
            break
    assert resp.status_code == 400, resp.get_data()
    assert fp.requests == []
    now = left(app)
    assert (now["tokens-minute"], now["usd-day"], now["quota-day"]) == (TOKENS, USD, 10000)


@BOTH
@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_is_not_json_and_charges_nothing(app: Flask, client: FlaskClient, key: str,
                                             fp: FakeProvider, endpoint: str,
                                             constant: str) -> None:
    """Python reads NaN, the SDK's encoder refuses it after the call was reserved (was: a 502
    charged as reserved): it is a 400 before anything is charged."""
    url = "/v1/messages" if endpoint == "anthropic" else "/v1/chat/completions"
    body = json.dumps({"model": model_of(endpoint), "messages": HELLO, "max_tokens": MAX,
                       "temperature": 0.5}).replace("0.5", constant)
    resp = client.post(url, headers={"Authorization": f"Bearer {key}"}, data=body,
                       content_type="application/json")
    assert resp.status_code == 400, resp.get_data()
    assert fp.requests == []
    now = left(app)
    assert (now["tokens-minute"], now["usd-day"], now["concurrent"], now["quota-day"]) == \
        (TOKENS, USD, 4, 10000), now


def test_a_value_the_sdk_cannot_encode_is_not_billed(fp: FakeProvider) -> None:
    """Any other failure before the request leaves (here the real SDK's encoder refusing a
    NaN the library API was handed) is ours, a 502, and not billed."""
    from limiting.providers.errors import guarded_call
    from limiting.providers.llm_calls import create

    seen: list[int] = []
    with pytest.raises(UpstreamError) as caught:
        create("openai", {"model": GPT, "messages": HELLO, "temperature": float("nan")},
               lambda h, status, t: seen.append(status), 10)
    assert (caught.value.status, caught.value.billed) == (502, False)
    assert fp.requests == [] and seen == []
    reply = create("openai", {"model": GPT, "messages": HELLO}, lambda h, s, t: None, 10)
    assert reply.status == 200 and len(fp.requests) == 1   # the same client, once sendable
    with pytest.raises(UpstreamError) as caught:
        guarded_call("openai", lambda h, s, t: None, 0, lambda: [][0])
    assert caught.value.billed is False   # nothing was sent at all
