"""The fake provider's HTTP surface, its concurrency and its command line."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from fakeprovider import FakeProvider, format_duration, parse_duration
from tests import fake_clients
from tests.conftest import ROOT
from tests.fake_clients import USER

# The fake and its clients (tests/fake_clients.py), as fixtures of this module.
server, fp, oai, ant = fake_clients.server, fake_clients.fp, fake_clients.oai, fake_clients.ant


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


@pytest.mark.slow
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
    assert elapsed < 60, elapsed    # served together: one at a time would take 150 s


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
