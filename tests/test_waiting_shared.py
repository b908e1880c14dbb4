"""A waiter holds no one else (issue 19, item 1), end to end: gunicorn x4 (gevent) in front of
the fake provider, the real openai SDK through /v1.

Plan ``slow`` waits for its own bucket (one request per 20 s, max_wait_seconds 120). Four of
its callers wait in future slots, 20-80 s away, of three layers they share with others: the
model's guard window (with ``reserve = { pro = 0.5 }``), an org's window, and a route scope's
window. Each waiter's charge counts in every window that holds its slot, and in nothing else:
while they wait, callers of other plans are served at once up to exactly what the windows
hold, the reserve shares still hold, and once the waiters hang up, their charges leave no
trace: the same callers are served at once again, exactly up to the limits.

Before the fix, the first waiter's slot became the earliest slot of everyone sharing the
layer: ``pro`` was refused (``upstream_saturated``, retry after ~80 s) with the model almost
unused, and the block outlived the waiters.
"""

from __future__ import annotations

import json
import socket
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
import redis
from flask import Flask

from app import create_app
from limiting.core.ask import Ask
from limiting.core.decision import GuardRefused, Refused
from limiting.core.groups import Group
from limiting.core.layers import window
from limiting.core.policy import Policy, parse_policy
from limiting.engine import Engine
from limiting.reservation import Reservation
from tests.conftest import Gunicorn, keyed_app
from tests.policies import LOADED, plan, policy, served_by

GUARDED, PLAIN = "gpt-guarded", "gpt-plain"
SLOW = plan(1, 1 / 15, "1000 per day", max_wait_seconds=120)   # waiters' slots: 15 s apart
BIG = plan(1000, 100, "10000 per day")
POLICY = policy(
    per_ip="100000 per 10 seconds", default="pro", store=LOADED,
    plans={"slow": SLOW, "pro": BIG, "starter": BIG},
    # The guard: 20 a minute, 10 of them kept for pro (starter and slow stop at 10).
    models={GUARDED: served_by("openai", requests_per_minute=20, reserve={"pro": 0.5}),
            PLAIN: served_by("openai")},   # no windows: only the layers under test bind
    users={}) + """
[orgs."acme"]
quotas = ["10 per minute"]

[users]
"slow-o" = { plan = "slow", org = "acme" }
"pro-o" = { plan = "pro", org = "acme" }

[routes."openai_api.chat_completions"]
quotas = ["10 per minute"]
scope = "v1"
key = "header:X-Team"
"""
USERS = {"slow-g": "slow", "pro-g": "pro", "starter-g": "starter", "slow-o": "slow",
         "pro-o": "pro", "slow-r": "slow"}
HELLO = [{"role": "user", "content": "hello"}]
WAITERS = 4
# /v1 refusals as calls() tells them, by their code: in each test only the layer under test
# can refuse the other plan's caller (its bucket and quota are far from full).
GUARD = "upstream_saturated"
ORG = ROUTE = "rate_limit_exceeded"


@dataclass
class Served:
    server: Gunicorn
    keys: dict[str, str]
    operator: Flask


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Served]:
    store = redis.Redis.from_url(redis_url)
    store.flushall()
    store.close()
    folder = tmp_path_factory.mktemp("waiting-shared")
    (folder / "limits.toml").write_text(POLICY)
    env = {"REDIS_URL": redis_url, "LIMITS_CONFIG": str(folder / "limits.toml")}
    with keyed_app(folder, env, USERS, workers=4) as (server, _, keys):
        yield Served(server, keys, create_app(env))


def quota_left(served: Served, user: str) -> int:
    """The user's quota-day remaining, as `flask limits show USER` prints it."""
    shown = served.operator.test_cli_runner().invoke(args=["limits", "show", user])
    assert shown.exit_code == 0, shown.output
    (row,) = [line.split() for line in shown.output.splitlines()
              if line.startswith("quota-day")]
    return int(row[2])


def team(name: str | None) -> str:
    """The X-Team the route scope counts by: a fresh one each call unless named (only the
    route scope's test shares one)."""
    return name or uuid.uuid4().hex


def calls(served: Served, user: str, model: str, n: int, named: str | None = None
          ) -> list[str]:
    """``n`` chat completions, one after another, none willing to wait: "ok", or the
    refusal's code."""
    oai = openai.OpenAI(base_url=served.server.url + "/v1", api_key=served.keys[user],
                        max_retries=0, timeout=30,
                        default_headers={"X-RateLimit-Max-Wait": "0"})
    out = []
    with oai:
        for _ in range(n):
            try:
                oai.chat.completions.create(model=model, messages=HELLO,
                                            extra_headers={"X-Team": team(named)})
                out.append("ok")
            except openai.RateLimitError as exc:
                out.append(str(exc.code))
    return out


class Waiters:
    """``WAITERS`` callers of ``user`` (plan slow, its bucket just emptied) admitted into
    their future slots over raw sockets, so that the test can hang them up."""

    def __init__(self, served: Served, user: str, model: str, named: str | None = None
                 ) -> None:
        self.served, self.user, self.model, self.named = served, user, model, named
        self.socks: list[socket.socket] = []

    def __enter__(self) -> Waiters:
        served = self.served
        assert calls(served, self.user, self.model, 1, self.named) == ["ok"]   # the bucket's one
        left = quota_left(served, self.user)
        body = json.dumps({"model": self.model, "messages": HELLO}).encode()
        for _ in range(WAITERS):
            sock = socket.create_connection(("127.0.0.1", served.server.port))
            self.socks.append(sock)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Authorization: Bearer " + served.keys[self.user].encode() + b"\r\n"
                         b"X-Team: " + team(self.named).encode() + b"\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            # Admitted (charged) before the next one comes: arrival order is slot order.
            deadline = time.monotonic() + 10
            while quota_left(served, self.user) != left - len(self.socks):
                assert time.monotonic() < deadline, "a waiter was never admitted"
                time.sleep(0.05)
        return self

    def hang_up(self) -> None:
        left = quota_left(self.served, self.user)
        for sock in self.socks:
            sock.close()
        self.socks = []
        deadline = time.monotonic() + 10
        # Seen within a poll (0.25 s); each waiter's charges go back, its quota-day too.
        while quota_left(self.served, self.user) != left + WAITERS:
            assert time.monotonic() < deadline, "the waiters' charges never came back"
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        for sock in self.socks:
            sock.close()


def test_waiters_hold_no_one_on_the_models_guard_and_reserve_shares_hold(
        served: Served) -> None:
    """The guard's window, 20 a minute, starter and slow capped at 10: slow's 1 + 4 waiters
    count in it; pro is served at once; starter fills it to its 10 and no further. After the
    hang-up the 4 are free again: pro fills it to exactly 20."""
    with Waiters(served, "slow-g", GUARDED) as waiters:
        assert calls(served, "pro-g", GUARDED, 1) == ["ok"]               # 6 in the window
        assert calls(served, "starter-g", GUARDED, 5) == \
            ["ok"] * 4 + [GUARD]                          # 10: its ceiling
        waiters.hang_up()
    # The waiters' 4 are free again: pro fills the window to its 20 and no further.
    assert calls(served, "pro-g", GUARDED, 15) == ["ok"] * 14 + [GUARD]
    assert calls(served, "starter-g", GUARDED, 1) == [GUARD]


def test_waiters_hold_no_one_on_an_orgs_window(served: Served) -> None:
    """The org's 10 a minute: slow-o's 1 + 4 waiters count; pro-o, another plan of the same
    org, is served at once up to the 10 and no further, and after the hang-up 4 more."""
    with Waiters(served, "slow-o", PLAIN) as waiters:
        assert calls(served, "pro-o", PLAIN, 6) == ["ok"] * 5 + [ORG]
        waiters.hang_up()
    assert calls(served, "pro-o", PLAIN, 5) == \
        ["ok"] * 4 + [ORG]


def test_waiters_hold_no_one_on_a_shared_route_scope(served: Served) -> None:
    """The route scope "v1", 10 a minute per X-Team: slow-r's 1 + 4 waiters count; pro-g on
    the same team is served at once up to the 10 and no further, and after the hang-up 4
    more."""
    with Waiters(served, "slow-r", PLAIN, "r") as waiters:
        assert calls(served, "pro-g", PLAIN, 6, "r") == ["ok"] * 5 + [ROUTE]
        waiters.hang_up()
    assert calls(served, "pro-g", PLAIN, 5, "r") == ["ok"] * 4 + [ROUTE]


# --- the same, through the engine (one server: one all-or-nothing call) --------------------


@pytest.fixture
def engine(engine_on: Callable[[Policy], Engine]) -> tuple[Engine, Policy]:
    pol = parse_policy(tomllib.loads(POLICY), "limits.toml")
    return engine_on(pol), pol


def _outcomes(take: Callable[[], object], n: int) -> list[str]:
    out = []
    for _ in range(n):
        try:
            take()
            out.append("ok")
        except GuardRefused:
            out.append("guard")
        except Refused as exc:
            refused = exc.decision.refused
            out.append(refused.layer.name if refused is not None else "?")
    return out


def _waiters(eng: Engine, pol: Policy, model: str, **more: Any) -> list[Reservation]:
    """slow's one token now, then WAITERS admitted into their slots, 15 s apart: all
    within the minute, so every one counts in a window with the calls made now."""
    ask = Ask(model, pol.models[model], 5, 5)
    eng.reserve("slow-e", pol.plans["slow"], ask, **more)
    held = [eng.reserve("slow-e", pol.plans["slow"], ask, max_wait=120, **more)
            for _ in range(WAITERS)]
    assert [round(r.decision.delay / 15) for r in held] == [1, 2, 3, 4]
    return held


def test_engine_guard_waiters_hold_no_one_and_reserve_holds(
        engine: tuple[Engine, Policy]) -> None:
    eng, pol = engine
    ask = Ask(GUARDED, pol.models[GUARDED], 5, 5)

    def take(plan: str) -> Callable[[], object]:
        return lambda: eng.reserve(f"{plan}-e", pol.plans[plan], ask)

    held = _waiters(eng, pol, GUARDED)
    assert _outcomes(take("pro"), 1) == ["ok"]
    assert _outcomes(take("starter"), 5) == ["ok"] * 4 + ["guard"]
    assert _outcomes(take("pro"), 11) == ["ok"] * 10 + ["guard"]
    for r in held:
        r.refund_everything()
    assert _outcomes(take("pro"), 5) == ["ok"] * 4 + ["guard"]
    assert _outcomes(take("starter"), 1) == ["guard"]


def test_engine_org_waiters_hold_no_one(engine: tuple[Engine, Policy]) -> None:
    eng, pol = engine
    org = pol.orgs["acme"]
    ask = Ask(PLAIN, pol.models[PLAIN], 5, 5)

    def take() -> object:
        return eng.reserve("pro-e", pol.plans["pro"], ask, org=org)

    held = _waiters(eng, pol, PLAIN, org=org)
    assert _outcomes(take, 6) == ["ok"] * 5 + ["org:acme/quota-minute"]
    for r in held:
        r.refund_everything()
    assert _outcomes(take, 5) == ["ok"] * 4 + ["org:acme/quota-minute"]


def test_engine_route_scope_waiters_hold_no_one(engine: tuple[Engine, Policy]) -> None:
    eng, pol = engine
    ask = Ask(PLAIN, pol.models[PLAIN], 5, 5)
    scope = window("v1:minute", "w60", 10, 60, "fail_open")

    def route() -> Group:
        tag = "rl:{s:v1:h:red}"
        return Group.of([scope], [f"{tag}:w60"], [1], tag)

    def take() -> object:
        return eng.reserve("pro-e", pol.plans["pro"], ask, extra=[route()])

    held = _waiters(eng, pol, PLAIN, extra=[route()])
    assert _outcomes(take, 6) == ["ok"] * 5 + ["v1:minute"]
    for r in held:
        r.refund_everything()
    assert _outcomes(take, 5) == ["ok"] * 4 + ["v1:minute"]
