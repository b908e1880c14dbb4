"""Seeing the limiter: Server-Timing on every response it decided (admitted, refused by the
store, refused at the door from the deny cache), and OpenTelemetry spans for decide, upstream
and settle when a tracer provider is configured — none, at no cost, when it is not."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from flask import Flask

from app import create_app
from tests.conftest import ROOT
from tests.policies import LOADED, plan, policy, write_policy

POLICY = policy(store=LOADED, per_ip="100000 per 10 seconds", default="p",
                plans={"p": plan(2, 0.001, "100 per day")})
TIMING = re.compile(r"^limiter;dur=\d+\.\d{2}$")


@pytest.fixture
def app(tmp_path: Path, r: redis.Redis, redis_url: str) -> Flask:
    return create_app({"REDIS_URL": redis_url, "LIMITS_CONFIG": write_policy(tmp_path, POLICY),
                       "TESTING": True})


def test_every_decided_response_says_how_long_deciding_took(app: Flask) -> None:
    client = app.test_client()
    replies = [client.post("/chat", json={"message": "hi", "user_id": "st"}) for _ in range(4)]
    assert [r.status_code for r in replies] == [200, 200, 429, 429]
    for reply in replies:
        assert TIMING.match(reply.headers["Server-Timing"]), reply.headers
    # Nothing was decided for an exempt route.
    assert "Server-Timing" not in client.get("/healthz").headers


def test_a_door_refusal_says_it_too(app: Flask) -> None:
    client = app.test_client()
    seen = [client.post("/chat", json={"message": "hi", "user_id": "door"}) for _ in range(6)]
    assert [r.status_code for r in seen][:2] == [200, 200]
    assert all(TIMING.match(r.headers["Server-Timing"]) for r in seen)


def test_no_tracer_provider_means_no_spans_and_one_shared_nothing() -> None:
    code = ("from limiting.tracing import span, tracing, _NOTHING\n"
            "assert not tracing() and span('limiter.decide') is _NOTHING\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_spans_for_decide_upstream_and_settle(tmp_path: Path, redis_url: str) -> None:
    """In a process of its own: a tracer provider is set once per process."""
    code = f"""
import json
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
from app import create_app
app = create_app({{"REDIS_URL": {redis_url!r}, "LIMITS_CONFIG": {str(tmp_path / "p.toml")!r}}})
keys = app.extensions["llm_limiter"].keys
key, _ = keys.create("traced", plan="p")
client = app.test_client()
ok = client.post("/v1/chat/completions", headers={{"Authorization": "Bearer " + key}},
                 json={{"model": "echo", "messages": [{{"role": "user", "content": "hi"}}]}})
assert ok.status_code == 200, ok.text
for _ in range(3):
    last = client.post("/v1/chat/completions", headers={{"Authorization": "Bearer " + key}},
                       json={{"model": "echo", "messages": [{{"role": "user", "content": "hi"}}]}})
assert last.status_code == 429
spans = [(s.name, dict(s.attributes)) for s in exporter.get_finished_spans()]
print(json.dumps(spans))
"""
    (tmp_path / "p.toml").write_text(POLICY)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    import json
    spans = json.loads(done.stdout.strip().splitlines()[-1])
    names = [name for name, _ in spans]
    assert names.count("limiter.decide") == 4   # the last from the deny cache, at the door
    assert "limiter.upstream" in names and "limiter.settle" in names
    decides = [attrs for name, attrs in spans if name == "limiter.decide"]
    assert decides[0]["limiter.allowed"] is True and "user" in decides[0]["limiter.layers"]
    assert decides[-1]["limiter.allowed"] is False
    assert decides[-1]["limiter.refused_by"] == "user" and decides[-1]["limiter.wait_seconds"] > 0
    upstream = next(attrs for name, attrs in spans if name == "limiter.upstream")
    assert upstream["llm.model"] == "echo"


def test_a_429_body_names_the_layer_and_its_numbers(app: Flask) -> None:
    client = app.test_client()
    for _ in range(2):
        client.post("/chat", json={"message": "hi", "user_id": "numbers"})
    body = client.post("/chat", json={"message": "hi", "user_id": "numbers"}).get_json()
    assert body["code"] == "rate_limited" and body["layer"] == "user"
    assert (body["limit"], body["remaining"], body["unit"]) == (2, 0, "requests")
    assert body["window_seconds"] == 2000 and 1 <= body["resets_in_seconds"] <= 2000
