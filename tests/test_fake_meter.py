"""The fake provider's bill meter: what each call, stream, cut and refusal is billed."""

from __future__ import annotations

import anthropic
import httpx
import httpx2
import openai
import pytest

from fakeprovider import Bill, FakeProvider, MeterReading
from tests import fake_clients
from tests.fake_clients import USER

# The fake and its clients (tests/fake_clients.py), as fixtures of this module.
server, fp, oai, ant = fake_clients.server, fake_clients.fp, fake_clients.oai, fake_clients.ant


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
    fp.set_delay(1.5)   # well past the 0.2 s client timeout, even on a stalled box
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
