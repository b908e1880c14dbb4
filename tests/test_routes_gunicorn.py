"""Route limits across gunicorn workers: the example app (examples/adopt) served with the
project's gunicorn.conf.py, and exactness of a decorated route over 4 worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import ROOT, free_port, wait_http, write_policy
from tests.policies import loaded_toml


@pytest.fixture
def example(tmp_path: Path, r: redis.Redis, unix_url: str) -> Iterator[str]:
    """examples/adopt/app.py under gunicorn, 4 workers, as its docstring says to run it."""
    port = free_port()
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "REDIS_URL": unix_url,
           "WEB_CONCURRENCY": "4", "LIMITER_INSTANCE": str(tmp_path / "instance")}
    env.pop("LIMITS_CONFIG", None)      # limits.toml beside the app is found by itself
    with open(tmp_path / "gunicorn.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:limiting.gunicorn",
             "examples.adopt.app:app"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz", proc=proc)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def fire(url: str, n: int, headers: dict[str, str]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    with httpx.Client(limits=limits, timeout=30) as client, ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: client.post(url, headers=headers), range(n)))


def test_example_app_200_concurrent_admit_exactly_the_route_limit(example: str) -> None:
    # /report: "30 per hour" at cost 3 (10 calls) stacked on the shared "100 per day" scope.
    responses = fire(example + "/report", 200, {"X-Team": "red"})
    codes = [resp.status_code for resp in responses]
    assert codes.count(200) == 10 and codes.count(429) == 190
    refused = next(resp for resp in responses if resp.status_code == 429)
    assert refused.json()["layer"] == "route:report:hour"
    assert int(refused.headers["Retry-After"]) >= 1
    policy = refused.headers["RateLimit-Policy"]
    assert '"route:report:hour";q=30' in policy and '"reports:day";q=100' in policy
    # The 190 refusals charged nothing: the shared scope holds the 10 admitted calls alone.
    assert '"reports:day";r=90' in refused.headers["RateLimit"]
    blue = httpx.post(example + "/report", headers={"X-Team": "blue"})
    assert blue.status_code == 200, blue.text


ROUTED = ("[edge]\nper_ip = ['100000 per minute']\n" + loaded_toml() +
          "[plans.p]\nburst = 1000\nrefill_per_second = 1000\n"
          '[routes."chat.chat"]\nquotas = ["25 per day"]\nkey = "user"\n')


def test_toml_route_on_chat_is_exact_over_4_workers(gunicorn, tmp_path: Path, r: redis.Redis,
                                                    unix_url: str) -> None:
    app = gunicorn(REDIS_URL=unix_url, LIMITS_CONFIG=write_policy(tmp_path, ROUTED),
                   WEB_CONCURRENCY="4")
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    with httpx.Client(limits=limits, timeout=30) as client, ThreadPoolExecutor(200) as pool:
        responses = list(pool.map(lambda _: client.post(
            app.url + "/chat", json={"message": "hi", "user_id": "dee"}), range(200)))
    codes = [resp.status_code for resp in responses]
    assert codes.count(200) == 25 and codes.count(429) == 175
    refused = next(resp for resp in responses if resp.status_code == 429)
    assert refused.json()["layer"] == "route:chat.chat:day"


def test_example_app_serves_chat_and_its_own_bucket(example: str) -> None:
    chat = httpx.post(example + "/chat", json={"message": "hi", "user_id": "ann"})
    assert chat.status_code == 200 and chat.json() == {"reply": "echo: hi"}
    codes = [httpx.post(example + "/summarise", json={"text": "t"},
                        headers={"X-Team": "green"}).status_code for _ in range(7)]
    assert codes[:5] == [200] * 5 and codes[-1] == 429
    assert httpx.get(example + "/healthz").status_code == 200


def test_example_app_charges_the_teams_plan(example: str) -> None:
    """/ask is `@limiter.plan(user=team)`: the starter plan's bucket (10, then 0.5 a second),
    exact over 4 workers give or take what refilled while the calls ran."""
    started = time.monotonic()
    responses = fire(example + "/ask", 30, {"X-Team": "blue"})
    refill = 0.5 * (time.monotonic() - started)
    codes = [resp.status_code for resp in responses]
    assert set(codes) <= {200, 429}
    assert 10 <= codes.count(200) <= 10 + int(refill) + 1
    refused = next(resp for resp in responses if resp.status_code == 429)
    assert refused.json()["layer"] == "user" and int(refused.headers["Retry-After"]) >= 1
    assert "RateLimit-Policy" in responses[codes.index(200)].headers
