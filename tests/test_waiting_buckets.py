"""A waiter never puts a token bucket it shares with others into debt (issue 19, item 1).

Plan ``slow`` waits for its own bucket (one request a minute, max_wait_seconds 300); its
member ``slow-o`` is in org ``acme``, whose bucket (burst 10, 0.04 a second: one token per
25 s) every member draws from. Four of slow-o's requests wait 60-240 s for their own slots.
A bucket shared with others gives a waiter only what it holds now: slow-o's 1 + 4 take 5 of
the org's 10, and ``pro-o``, another plan of the same org, is served at once up to exactly
the burst and no further; once the waiters hang up, their 4 tokens are back and nothing
else is: pro-o gets exactly 4 more.

Before the fix the org's bucket was charged as of each waiter's run time: a full bucket's
refill over the wait was taken too (min(burst, level + wait x rate) - 1 - wait x rate), and
after four waiters the org was in debt: pro-o was refused at once with 5 of the 10 unused.

SharedBucketMachine checks the rule on memory:// and the Lua at once, reply for reply,
against an exact reference of the shared bucket, with waiters that hang up.

The refill (one token per 25 s) leaves each test 25 s to count the burst exactly; each
takes a second or a few. Tokens only come back over time: a box that slow would see one ok
more at the end, never one fewer.
"""

from __future__ import annotations

import json
import socket
import struct
import time
import tomllib
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import openai
import pytest
import redis
from flask import Flask
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from limiting.core.ask import Ask
from limiting.core.codec import layer_args, with_deadline
from limiting.core.decision import Refused
from limiting.core.groups import Group
from limiting.core.naming import BODY_USER, KEY_USER, org_prefix
from limiting.core.policy import Policy, parse_policy
from limiting.core.routes import RouteLimit, sliding_window, token_bucket
from limiting.engine import Engine
from limiting.reservation import Reservation
from limiting.web.routes import RouteLimits, bind
from tests.clocked import ClockedMemory, ClockedValkey
from tests.conftest import Gunicorn, keyed_app
from tests.policies import LOADED, plan, policy, served_by
from tests.test_properties import EPS, PREFIX, START, Backend, machine_settings

MODEL = "gpt-plain"
SLOW = plan(1, 1 / 60, "1000 per day", max_wait_seconds=300)   # waiters' slots 60 s apart
BIG = plan(1000, 100, "10000 per day")
POLICY = policy(
    per_ip="100000 per 10 seconds", default="pro", store=LOADED,
    plans={"slow": SLOW, "pro": BIG}, models={MODEL: served_by("openai")}, users={}) + """
[orgs."acme"]
burst = 10
refill_per_second = 0.04

[users]
"slow-o" = { plan = "slow", org = "acme" }
"pro-o" = { plan = "pro", org = "acme" }
"""
USERS = {"slow-o": "slow", "pro-o": "pro"}
HELLO = [{"role": "user", "content": "hello"}]
WAITERS = 4
ORG_RATE = "org:acme/rate"


@pytest.fixture
def engine(engine_on: Callable[[Policy], Engine]) -> tuple[Engine, Policy]:
    pol = parse_policy(tomllib.loads(POLICY), "limits.toml")
    return engine_on(pol), pol


def _outcomes(eng: Engine, pol: Policy, user: str, n: int, **more: Any) -> list[str]:
    """``n`` reservations of ``user``, none willing to wait: "ok" or the refusing layer."""
    ask = Ask(MODEL, pol.models[MODEL], 5, 5)
    out = []
    for _ in range(n):
        try:
            eng.reserve(user, pol.plans[pol.users[user]], ask, **more)
            out.append("ok")
        except Refused as exc:
            refused = exc.decision.refused
            out.append(refused.layer.name if refused is not None else "?")
    return out


def _waiters(eng: Engine, pol: Policy, **more: Any) -> list[Reservation]:
    """slow's one token now, then WAITERS admitted into their slots 60 s apart."""
    ask = Ask(MODEL, pol.models[MODEL], 5, 5)
    slow = pol.plans["slow"]
    eng.reserve("slow-o", slow, ask, **more)
    held = [eng.reserve("slow-o", slow, ask, max_wait=300, **more)
            for _ in range(WAITERS)]
    assert [round(r.decision.delay / 60) for r in held] == [1, 2, 3, 4]
    return held


def test_engine_org_bucket_waiters_take_only_what_it_holds(
        engine: tuple[Engine, Policy]) -> None:
    eng, pol = engine
    org = pol.orgs["acme"]
    held = _waiters(eng, pol, org=org)
    # 5 of the org's 10 are slow-o's; pro-o gets the other 5 at once, and no more.
    assert _outcomes(eng, pol, "pro-o", 6, org=org) == ["ok"] * 5 + [ORG_RATE]
    # The org's bucket is empty now: a waiter is refused at once, by the org, with the time
    # until the org holds a token (its own bucket would have let it wait).
    ask = Ask(MODEL, pol.models[MODEL], 5, 5)
    with pytest.raises(Refused) as refused:
        eng.reserve("slow-o", pol.plans["slow"], ask, org=org, max_wait=300)
    decision = refused.value.decision
    assert decision.refused is not None and decision.refused.layer.name == ORG_RATE
    assert 0 < decision.retry_after <= 25
    for r in held:
        r.refund_everything()
    # The waiters' 4 tokens are back, and nothing else is held.
    assert _outcomes(eng, pol, "pro-o", 5, org=org) == ["ok"] * 4 + [ORG_RATE]


def _route_groups(limit: RouteLimit, user: str | None = "u1", org: str | None = None,
                  realm: str = KEY_USER, **headers: str) -> list[Group]:
    """``limit``'s groups as a request with ``headers`` meets it on route "x.y"."""
    with Flask("t").test_request_context(headers=headers):
        return RouteLimits().groups(bind("x.y", [limit]), user, org, realm)


def test_engine_shared_route_bucket_waiters_take_only_what_it_holds(
        engine: tuple[Engine, Policy]) -> None:
    """The same for a route's token bucket counted by a header (others reach it too)."""
    eng, pol = engine
    limit = token_bucket(10, 0.04, key="header:X-Team")
    held = _waiters(eng, pol, extra=_route_groups(limit, **{"X-Team": "red"}))
    assert _outcomes(eng, pol, "pro-o", 6, extra=_route_groups(limit, **{"X-Team": "red"})
                     ) == ["ok"] * 5 + ["route:x.y"]
    for r in held:
        r.refund_everything()
    assert _outcomes(eng, pol, "pro-o", 5, extra=_route_groups(limit, **{"X-Team": "red"})
                     ) == ["ok"] * 4 + ["route:x.y"]


def test_which_route_buckets_are_the_callers_own() -> None:
    """Only a bucket no one else reaches (the route's own, counted by the caller's user or
    the key it presented) lets a waiter run it into debt; windows are told apart by their
    tail (acquire.lua) and keep their kind."""
    def code(limit: RouteLimit, user: str | None = "u1", org: str | None = None,
             realm: str = KEY_USER, **headers: str) -> str:
        (group,) = _route_groups(limit, user, org, realm, **headers)
        return group.call.args[0].decode()

    assert code(token_bucket(5, 1, key="user")) == "b"
    assert code(token_bucket(5, 1, key="user"), realm=BODY_USER) == "b"   # as its plan's
    assert code(token_bucket(5, 1, key="key"), Authorization="Bearer sk-1") == "b"
    assert code(token_bucket(5, 1, key="org")) == "b"               # no org: an org of one
    assert code(token_bucket(5, 1, key="org"), org="acme") == "B"
    assert code(token_bucket(5, 1, key="user", scope="v1")) == "B"
    assert code(token_bucket(5, 1, key="user"), user=None) == "B"   # no user: by the IP
    assert code(token_bucket(5, 1, key="key")) == "B"               # no key: by the IP
    assert code(token_bucket(5, 1)) == "B"
    assert code(token_bucket(5, 1, key="header:X-Team"), **{"X-Team": "red"}) == "B"
    assert code(token_bucket(5, 1, key=lambda: "u:u1")) == "B"
    assert code(token_bucket(5, 1, mode="shadow")) == "B?"
    assert code(sliding_window("5 per minute")) == "w"


# ----------------------------------------------------------------------------------------
# A bucket shared with others ("B": an org's, a route scope's): a waiter takes only what it
# holds now, never a debt (issue 19, item 1)


def _level(backend: Backend, key: str) -> float | None:
    """A bucket's tokens as stored (at its last write), or None when it has none."""
    if isinstance(backend, ClockedMemory):
        item = backend._data.get(key)
        return None if item is None or item[0] <= backend.now_us else float(item[1][1])
    backend._expire_now()
    raw = backend.client.get(key)
    return None if raw is None else float(struct.unpack("<dd", raw)[0])


class SharedBucketMachine(RuleBasedStateMachine):
    """A waiting plan (its own bucket of burst 1, a deadline) and callers that never wait,
    all drawing from one shared bucket, on memory:// and the Lua at once, every reply
    compared; a waiter may hang up before its slot. Against an exact reference of the shared
    bucket: a waiter passes it only with a token there now, and takes it now; a caller that
    never waits passes exactly when a token is there; a refusal by it says the exact time
    until one is; a hang-up puts the token back, capped at the burst; it never holds less
    than 0."""

    def __init__(self, memory: ClockedMemory, valkey: ClockedValkey) -> None:
        super().__init__()
        self.backends: tuple[Backend, Backend] = (memory, valkey)

    @initialize(cap=st.integers(1, 6), rate=st.sampled_from([0.05, 0.25, 0.5, 2.0]),
                own=st.sampled_from([0.05, 0.5, 2.0]), start=START)
    def setup(self, cap: int, rate: float, own: float, start: int) -> None:
        self.cap, self.rate, self.own = cap, Fraction(rate), own
        self.shared_key, self.own_key = PREFIX + "shared", PREFIX + "own"
        self.held, self.at = Fraction(cap), start     # the reference: tokens at a time
        self.waiting: list[tuple[int, int]] = []      # (run µs, charged_at) of waiters
        for b in self.backends:
            b.now_us = start

    @property
    def now(self) -> int:
        return self.backends[0].now_us

    def tokens(self) -> Fraction:
        return min(Fraction(self.cap), self.held + (self.now - self.at) * self.rate / 10**6)

    def call(self, keys: list[str], args: list[bytes]) -> list[int]:
        mem, lua = (b.acquire(keys, args) for b in self.backends)
        assert mem == lua
        return mem

    def shared_args(self) -> list[bytes]:
        return layer_args("B", self.cap, float(self.rate), "1")

    def checked(self, reply: list[int], layer: int) -> None:
        """Passed only with a token there now (taken now); refused by it with the exact
        time until one is."""
        tokens = self.tokens()
        if reply[0] == 1:
            assert tokens >= 1 - EPS
            self.held, self.at = tokens - 1, self.now
        elif reply[1] == layer:
            assert tokens < 1 + EPS
            exact = (1 - tokens) / self.rate * 10**6 + 1
            assert abs(reply[2] - exact) <= 2, (reply[2], float(exact))
        elif tokens >= 1 + EPS:
            pass    # refused by the waiter's own bucket, beyond its deadline
        else:
            assert tokens < 1 + EPS   # both refuse: the longer wait is told

    @rule(n=st.integers(0, 30), unit=st.sampled_from([1, 10**5, 10**6, 10 * 10**6]))
    def advance(self, n: int, unit: int) -> None:
        for b in self.backends:
            b.now_us += n * unit

    @rule(deadline_s=st.sampled_from([1, 5, 30, 120]))
    def waiter(self, deadline_s: float) -> None:
        args = [*layer_args("b", 1, self.own, "1"), *self.shared_args()]
        reply = self.call([self.own_key, self.shared_key],
                          list(with_deadline(args, deadline_s * 10**6)))
        tokens = self.tokens()
        if not (abs(tokens - 1) < EPS):
            self.checked(reply, 2)
        elif reply[0] == 1:
            self.held, self.at = tokens - 1, self.now
        if reply[0] == 1 and reply[2] > 0:
            self.waiting.append((reply[3] + reply[2], reply[3]))

    @rule()
    def other(self) -> None:
        reply = self.call([self.shared_key], self.shared_args())
        tokens = self.tokens()
        if abs(tokens - 1) >= EPS:
            assert (reply[0] == 1) == (tokens >= 1)
        if reply[0] == 1:
            assert reply[2] == 0
        self.checked(reply, 1)

    @rule(pick=st.integers(0, 100))
    def hang_up(self, pick: int) -> None:
        waiting = [w for w in self.waiting if w[0] > self.now]
        if not waiting:
            return
        w = waiting[pick % len(waiting)]
        self.waiting.remove(w)
        stored = [_level(b, self.shared_key) for b in self.backends]
        for b in self.backends:
            b.settle([self.own_key, self.shared_key],
                     [w[1], "b", 1, -1, "b", self.cap, -1])
        if stored[0] is not None:   # an expired key is a full bucket: nothing to give back
            self.held = min(Fraction(self.cap), self.held + 1)

    @invariant()
    def never_a_debt(self) -> None:
        if not hasattr(self, "held"):
            return
        levels = [_level(b, self.shared_key) for b in self.backends]
        assert (levels[0] is None) == (levels[1] is None)
        if levels[0] is not None and levels[1] is not None:
            assert levels[0] >= 0 and levels[1] >= 0
            assert abs(levels[0] - levels[1]) < 1e-9
            assert abs(levels[0] - float(self.held)) < 1e-6


def test_a_waiter_never_puts_a_shared_bucket_in_debt(r: redis.Redis) -> None:
    run_state_machine_as_test(lambda: SharedBucketMachine(ClockedMemory(), ClockedValkey(r)),
                              settings=machine_settings(60))


# --- end to end: gunicorn x4 (gevent), the openai SDK through /v1 -------------------------


def calls(server: Gunicorn, key: str, n: int) -> list[str]:
    """``n`` chat completions, none willing to wait: "ok", or the refusal's code."""
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30,
                        default_headers={"X-RateLimit-Max-Wait": "0"})
    out = []
    with oai:
        for _ in range(n):
            try:
                oai.chat.completions.create(model=MODEL, messages=HELLO)
                out.append("ok")
            except openai.RateLimitError as exc:
                out.append(str(exc.code))
    return out


def org_level(r: redis.Redis) -> float:
    """The org's bucket as stored (tokens held at its last write)."""
    raw = r.get(org_prefix("rl:", "acme") + "b")
    assert raw is not None
    held, _at = struct.unpack("<dd", raw)
    return float(held)


def test_org_bucket_waiters_hold_no_one_under_gunicorn(tmp_path_factory: pytest.TempPathFactory,
                                                        redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    r.flushall()
    folder = tmp_path_factory.mktemp("waiting-buckets")
    (folder / "limits.toml").write_text(POLICY)
    env = {"REDIS_URL": redis_url, "LIMITS_CONFIG": str(folder / "limits.toml")}
    socks: list[socket.socket] = []
    try:
        with keyed_app(folder, env, USERS, workers=4) as (server, _, keys):
            assert calls(server, keys["slow-o"], 1) == ["ok"]
            body = json.dumps({"model": MODEL, "messages": HELLO}).encode()
            for n in range(1, WAITERS + 1):
                sock = socket.create_connection(("127.0.0.1", server.port))
                socks.append(sock)
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                             b"Authorization: Bearer " + keys["slow-o"].encode() + b"\r\n"
                             b"Content-Type: application/json\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                             + body)
                # Admitted (the org's token taken) before the next one comes.
                deadline = time.monotonic() + 10
                while org_level(r) > 9 - n + 0.5:
                    assert time.monotonic() < deadline, "a waiter was never admitted"
                    time.sleep(0.05)
            assert org_level(r) >= 0   # never a debt
            assert calls(server, keys["pro-o"], 6) == ["ok"] * 5 + ["rate_limit_exceeded"]
            for sock in socks:
                sock.close()
            # Seen within a poll (0.25 s): each waiter's token goes back to the org.
            deadline = time.monotonic() + 10
            while org_level(r) < 3.5:
                assert time.monotonic() < deadline, "the waiters' tokens never came back"
                time.sleep(0.05)
            assert calls(server, keys["pro-o"], 5) == ["ok"] * 4 + ["rate_limit_exceeded"]
    finally:
        for sock in socks:
            sock.close()
        r.close()
