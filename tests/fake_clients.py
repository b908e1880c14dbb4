"""The fake provider (fakeprovider/) as the SDK tests meet it: one server a module, reset
before each test, and the real openai and anthropic clients pointed at it."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import openai
import pytest

from fakeprovider import FakeProvider

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
