"""The fuzz tests' set-up (tests/test_fuzz_*.py): the apps under test, sending a request
and checking the invariants of every answer, and counting requests per endpoint.

Fuzzing every endpoint with hypothesis through the Flask test client.

Well over 1,000 malformed or hostile requests go to /chat, /v1/chat/completions, /v1/messages,
/v1/usage, /admin/usage(.json), /healthz, /metrics, unknown paths and wrong methods, mixed
with well-formed requests to the ``echo`` model that must succeed. Every answer is checked:
no 5xx, an error is JSON in its endpoint's shape with a code, and no body carries a
traceback or a secret (an API key, the admin token).

Runs are reproducible (``derandomize=True``); the request count per endpoint is printed by
the last test, which also checks the total.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, settings
from werkzeug.test import TestResponse

from app import create_app
from tests.conftest import write_policy
from tests.policies import LOADED, plan, policy, served_by

POLICY = policy(
    store=LOADED, per_ip="1000000 per 10 seconds", default="roomy", users={"test-user-1": "roomy"},
    plans={"roomy": plan(1000000, 100000, "100000000 per day", tokens_per_minute=1000000000,
                         default_max_tokens=64),
           "pro": plan(1000000, 100000, default_max_tokens=32)},
    models={"gpt-4o-mini": served_by("openai", requests_per_minute=1000000)})

ADMIN_TOKEN = "adm-Zq7wX3pL9vK2mN8rT4yB6cD1fG5hJ0s"   # distinctive, so a leak is unambiguous
ENV_UNSET = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "ADMIN_TOKEN", "REQUIRE_API_KEY",
             "DEFAULT_MODEL")

ROUTES = {
    ("POST", "/chat"): "chat",
    ("POST", "/v1/chat/completions"): "openai",
    ("POST", "/v1/messages"): "anthropic",
    ("GET", "/v1/usage"): "usage",
    ("GET", "/admin/usage"): "admin_page",
    ("GET", "/admin/usage.json"): "admin_json",
    ("GET", "/healthz"): "health",
    ("GET", "/metrics"): "metrics",
}
OTHER = "unknown path / wrong method"
COUNTS: Counter[str] = Counter()
STATUSES: dict[str, Counter[int]] = {}
FINISHED: set[str] = set()
FUZZ_TESTS = frozenset({
    "test_fuzz_chat", "test_fuzz_openai", "test_fuzz_anthropic", "test_fuzz_usage",
    "test_fuzz_admin", "test_fuzz_health_and_metrics", "test_fuzz_unknown_paths_and_methods",
    "test_body_size_boundary", "test_fuzz_every_query_parameter",
})
MIN_TOTAL = 1000

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example, HealthCheck.filter_too_much],
)


def fuzz(examples: int) -> settings:
    return settings(FUZZ, max_examples=examples)


# --- the apps under test --------------------------------------------------------------------------


@dataclass
class Target:
    app: Flask
    client: FlaskClient
    keyed: FlaskClient          # the same store, with REQUIRE_API_KEY on for /chat
    keys: dict[str, str]        # user -> key
    secrets: tuple[str, ...]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Target]:
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    client.close()
    policy = write_policy(tmp_path_factory.mktemp("fuzz"), POLICY)
    with pytest.MonkeyPatch.context() as mp:
        for name in ENV_UNSET:
            mp.delenv(name, raising=False)
        # Not TESTING: errors take the production path (handlers, not propagation).
        config = {"REDIS_URL": redis_url, "LIMITS_CONFIG": policy, "ADMIN_TOKEN": ADMIN_TOKEN}
        app = create_app(config)
        keyed = create_app({**config, "REQUIRE_API_KEY": "1"})
        store = app.extensions["llm_limiter"].keys
        keys = {
            "fuzzer": store.create("fuzzer")[0],
            "pro-user": store.create("pro-user", plan="pro")[0],
            "{u:victim}:x": store.create("{u:victim}:x")[0],
            "ünï ☃": store.create("ünï ☃", plan="pro")[0],
        }
        yield Target(app, app.test_client(), keyed.test_client(), keys,
                     (ADMIN_TOKEN, *keys.values()))


# --- sending and checking -------------------------------------------------------------------------


@dataclass
class Req:
    method: str
    path: str
    data: bytes | None = None
    headers: dict[str, str] | None = None      # validated by werkzeug: no CR/LF
    environ: dict[str, str] | None = None      # raw CGI variables: anything latin-1
    query: str | None = None


def send(client: FlaskClient, req: Req, count: bool = True) -> TestResponse:
    known = (req.method.upper(), req.path) in ROUTES
    label = f"{req.method.upper()} {req.path}" if known else OTHER
    resp = client.open(req.path, method=req.method, data=req.data, headers=req.headers or {},
                       environ_overrides=req.environ or {}, query_string=req.query)
    if count:
        COUNTS[label] += 1
        STATUSES.setdefault(label, Counter())[resp.status_code] += 1
    return resp


def sse_events(text: str) -> list[tuple[str | None, str]]:
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data.append(line[len("data: "):])
        events.append((name, "\n".join(data)))
    return events


def check(resp: TestResponse, req: Req, secrets: tuple[str, ...]) -> Any:
    """The invariants of every answer; returns the parsed JSON (or SSE events), if any."""
    status = resp.status_code
    raw = resp.get_data()
    text = raw.decode("utf-8", "replace")
    where = f"{req.method} {req.path} -> {status} {resp.mimetype}: {text[:400]!r}"
    assert "Traceback" not in text and 'File "/' not in text, where
    for secret in secrets:
        assert secret not in text, f"secret in body: {where}"
    for name, value in resp.headers.items():
        assert "\r" not in value and "\n" not in value, f"CR/LF in header {name}: {where}"
        assert not any(s in value for s in secrets), f"secret in header {name}: {where}"
    rid = resp.headers.get("X-Request-ID")
    if rid is not None:
        assert 0 < len(rid) <= 128 and rid.isprintable(), where
    kind = ROUTES.get((req.method.upper(), req.path))
    if status >= 500:
        # The only 5xx the contract allows, and none is expected with a healthy store.
        assert status == 503, where
        body = resp.get_json(silent=True) or {}
        code = body.get("code") or (body.get("error") or {}).get("code")
        assert code in ("limiter_unavailable", "upstream_saturated"), where
    if req.method == "HEAD":
        return None
    if req.method == "OPTIONS" and status == 200:
        assert "Allow" in resp.headers and raw == b"", where
        return None
    if 300 <= status < 400:      # werkzeug's own slash-merging redirect, not an error
        assert "Location" in resp.headers, where
        return None
    if status == 200 and kind == "metrics":
        assert resp.mimetype == "text/plain", where
        return None
    if status == 200 and kind == "admin_page":
        assert resp.mimetype == "text/html", where
        return None
    if status == 200 and resp.mimetype == "text/event-stream":
        assert kind in ("openai", "anthropic"), where
        events = sse_events(raw.decode("utf-8"))
        for _, data in events:
            if data != "[DONE]":
                assert isinstance(json.loads(data), dict), where
        return events
    assert resp.mimetype == "application/json", where
    try:
        body = json.loads(raw.decode("utf-8"))
    except ValueError:
        pytest.fail(f"not JSON: {where}")
    assert isinstance(body, dict), where
    if status >= 400:
        if kind == "openai":
            error = body.get("error")
            assert isinstance(error, dict), where
            assert isinstance(error.get("message"), str) and error["message"], where
            assert isinstance(error.get("type"), str), where
            assert isinstance(error.get("code"), str), where
            assert "param" in error, where
        elif kind == "anthropic":
            assert body.get("type") == "error" and isinstance(body.get("error"), dict), where
            assert isinstance(body["error"].get("type"), str), where
            assert isinstance(body["error"].get("message"), str), where
        else:
            assert isinstance(body.get("error"), str) and body["error"], where
            assert isinstance(body.get("code"), str) and body["code"], where
        if status == 429:
            assert int(resp.headers.get("Retry-After", "1")) >= 1, where
    return body


def run(target: Target, req: Req, client: FlaskClient | None = None,
        extra_secrets: tuple[str, ...] = ()) -> tuple[TestResponse, Any]:
    resp = send(client or target.client, req)
    return resp, check(resp, req, target.secrets + extra_secrets)



@dataclass
class Case:
    req: Req
    must_pass: bool = False         # well-formed, with a valid key where one is needed
    keyed: bool = False             # /chat on the REQUIRE_API_KEY app
    made_up: str | None = None      # a fake key sent along: it must not be echoed either
    stream: bool = False



def run_case(target: Target, case: Case) -> tuple[TestResponse, Any]:
    client = target.keyed if case.keyed else target.client
    resp, body = run(target, case.req, client, (case.made_up,) if case.made_up else ())
    if case.must_pass:
        assert resp.status_code == 200, (case.req, resp.get_data()[:400])
    return resp, body

