"""Waiting with a deadline through /v1 with the real openai and anthropic SDKs, plain and
streamed, against the fake provider under gunicorn x4: a burst of calls for one key is served
in its future slots, spaced by the rate; the calls whose slot lies past the deadline get the
SDK's RateLimitError at once."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import anthropic
import openai
import pytest
import redis

from tests.conftest import keyed_app
from tests.policies import LOADED, plan, policy, served_by

VARIANTS = ["openai", "openai-stream", "anthropic", "anthropic-stream"]
USERS = {f"{v}-{n}": "w" for v in VARIANTS for n in (8, 24)}
POLICY = policy(
    store=LOADED, per_ip="100000 per 10 seconds", default="w",
    plans={"w": plan(1, 4, max_wait_seconds=3)},
    models={"gpt-4o-mini": served_by("openai", requests_per_minute=100000),
            "claude-3-5-haiku-latest": served_by("anthropic", requests_per_minute=100000)})
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, redis_url: str
           ) -> Iterator[tuple[str, dict[str, str]]]:
    redis.Redis.from_url(redis_url).flushall()
    folder = tmp_path_factory.mktemp("waiting-v1")
    (folder / "limits.toml").write_text(POLICY)
    env = {"REDIS_URL": redis_url, "LIMITS_CONFIG": str(folder / "limits.toml")}
    with keyed_app(folder, env, USERS, workers=4) as (server, _, keys):
        yield server.url, keys


def caller(url: str, key: str, variant: str) -> Callable[[], str]:
    """One call of ``variant``: "ok", or "429" for the SDK's RateLimitError."""
    if variant.startswith("openai"):
        oai = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)

        def call() -> str:
            try:
                if variant.endswith("stream"):
                    chunks = list(oai.chat.completions.create(model="gpt-4o-mini",
                                                              messages=HELLO, stream=True))
                    assert chunks
                else:
                    assert oai.chat.completions.create(model="gpt-4o-mini",
                                                       messages=HELLO).choices
            except openai.RateLimitError:
                return "429"
            return "ok"
        return call
    ant = anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=30)

    def call_ant() -> str:
        try:
            if variant.endswith("stream"):
                with ant.messages.stream(model="claude-3-5-haiku-latest", max_tokens=16,
                                         messages=HELLO) as stream:
                    assert stream.get_final_message().content
            else:
                assert ant.messages.create(model="claude-3-5-haiku-latest", max_tokens=16,
                                           messages=HELLO).content
        except anthropic.RateLimitError:
            return "429"
        return "ok"
    return call_ant


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_sdk_calls_wait_for_their_slots(served: tuple[str, dict[str, str]],
                                        variant: str) -> None:
    url, keys = served
    call = caller(url, keys[f"{variant}-8"], variant)
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda _: call(), range(8))) == ["ok"] * 8
    call = caller(url, keys[f"{variant}-24"], variant)
    start = time.monotonic()

    def timed(_: int) -> tuple[str, float]:
        return call(), time.monotonic() - start

    with ThreadPoolExecutor(24) as pool:
        outcomes = list(pool.map(timed, range(24)))
    # 1 + 3 s x 4 when all 24 reach the store at once. Each served call got a slot no later
    # than its reply and the first slot is after ``start``: so however spread out a loaded
    # box made their arrivals, the served fit in 1 + 4 x (the last served reply) slots.
    served = [t for outcome, t in outcomes if outcome == "ok"]
    assert 13 <= len(served) <= 1 + int(4 * max(served)), outcomes
    assert len(served) + sum(outcome == "429" for outcome, _ in outcomes) == 24
