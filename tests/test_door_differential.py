"""A differential test of the door (limiting/web/door.py): two apps from one policy on two Valkey
databases — one as shipped, one with its Door taken out of the WSGI chain (Flask's own path,
its deny cache included) — fed the same sequences of requests by Hypothesis. They must answer
alike: the same status, the same body once digits are masked (waits count down), the same
rate-limit headers (by name), and a 200 echoes the message sent (no body lost at the door).

Allowed, and nothing else, are the differences door.py's docstring lists, each only for a
caller (or address) the store itself says is held — refused now, past its patience: the
door's 429 where Flask first finds fault with the request (400/401/403/404/413), or its plan's
429 where Flask names the edge's. Flask counts that bad request at the edge and the door does
not, so the test then counts it on the door's side too (``Side.resync``); the edge counters are
compared after every request.

Timing cannot make the apps disagree: a token comes back every 200 s at best, the edge's window
is a day, and each app's deny cache holds an entry for the store's whole wait (``HOLD``, not
its usual second). Each app learns and comes due by its own clock, so with the usual second
a slow moment between the two sends (a loaded box) had one app answer from its entry and the
other ask the store — whose call counts the edge even when it refuses, as every attempt
counts — and the edge counts parted by one with both answers alike. That an entry come due
is asked by Flask's path on both apps alike is checked on its own, with both clocks moved
(``test_an_entry_come_due_is_asked_on_both_sides_alike``).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from flask import Flask
from hypothesis import given
from hypothesis import strategies as st
from werkzeug.test import TestResponse

from app import create_app
from limiting.core.naming import BODY_USER, KEY_USER
from limiting.deny import MAX_STALE, PROBE_SECONDS
from limiting.web.door import Door
from tests.conftest import write_policy
from tests.fuzz_strategies import body_bytes, one_wrong
from tests.fuzzing import ENV_UNSET, fuzz
from tests.policies import LOADED, plan, policy

# starter waits ~1000 s for a token; patient ~200 s, within its 300 s of patience (so a
# patient caller is never held, only told to wait); quota is refused by its day quota.
EDGE_LIMIT = 16
POLICY = policy(store=LOADED, per_ip=f"{EDGE_LIMIT} per day", default="starter",
                users={"pat": "patient"},
                plans={"starter": plan(2, 0.001, "1000 per day"),
                       "patient": plan(2, 0.005, "1000 per day", max_wait_seconds=300),
                       "quota": plan(100, 0.001, "2 per day"),
                       "roomy": plan(1000, 0.001, "100000 per day")})
IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "2001:db8::1"]
BODY_USERS = ["ann", "bob", "pat", "qu", "{u:victim}", "é☃"]
KEYS = {"kim": ("kim", "starter"), "kim-spare": ("kim", "starter"), "pat": ("pat", "patient"),
        "ann": ("ann", "starter"), "qu": ("qu", "quota"), "rob": ("rob", "roomy")}
KEY_REFS = [*KEYS, "made-up"]
MESSAGES = ["hello", "é☃🙂 two words", "  spaced\tout  ", "a b c d", "hello", "x" * 70_000]
# None of these lets a patient caller wait for its ~200 s slot (the test would sleep).
MAX_WAITS = [None, None, "0", "1", "60", "abc", "-1", "inf", ""]
MODELS = st.sampled_from(["echo", "no-such-model", "gpt-4o-mini", ""])
ALLOWED = {400, 401, 403, 404, 413}
COMPARED = re.compile(r"^(retry-after|ratelimit.*|x-ratelimit-.*|anthropic-ratelimit-.*|"
                      r"content-type|allow|location)$", re.I)
EXAMPLES = 200
# How long a deny-cache entry answers here before the store is asked again (limiting/deny.py's
# max_stale, a second in production): longer than any sequence runs, so both apps answer
# every request of it from their entries or neither does, however slow the box.
HOLD = 3600.0
SEEN: Counter[str] = Counter()   # what the sequences had the door do, checked at the end


@dataclass(frozen=True)
class Step:
    route: str                      # chat, keyed (/chat with REQUIRE_API_KEY), openai,
    method: str                     # anthropic, other, revoke (of the key named by bearer)
    path: str
    ip: str = IPS[0]
    body: bytes | None = None
    bearer: str | None = None       # a KEY_REFS name, sent as "<scheme> <its key>"
    scheme: str = "Bearer"
    x_api_key: str | None = None
    max_wait: str | None = None
    content_type: str | None = "application/json"
    keyed: bool = False             # to the REQUIRE_API_KEY app (both serve /v1)


@dataclass(repr=False)
class Side:
    plain: Flask
    keyed: Flask
    db: redis.Redis
    keys: dict[str, str] = field(default_factory=dict)   # KEY_REFS name -> this store's key
    reached: list[str] = field(default_factory=list)     # one per request Flask saw

    @property
    def limiter(self) -> Any:
        return self.plain.extensions["llm_limiter"]

    def app(self, step: Step) -> Flask:
        return self.keyed if step.route == "keyed" or step.keyed else self.plain

    def reset(self) -> None:
        self.db.flushdb()
        for app in (self.plain, self.keyed):
            app.extensions["llm_limiter"].deny.clear()
        self.keys = {name: self.limiter.keys.create(user, plan=p)[0]
                     for name, (user, p) in KEYS.items()}
        self.keys["made-up"] = "llm_Zq7wX3pL9vK2mN8rT4yB6cD1"   # well formed, in no store

    def send(self, step: Step) -> TestResponse:
        headers = {name: value for name, value in (
            ("Authorization", step.bearer and f"{step.scheme} {self.keys[step.bearer]}"),
            ("X-API-Key", step.x_api_key and self.keys[step.x_api_key]),
            ("X-RateLimit-Max-Wait", step.max_wait), ("Content-Type", step.content_type),
        ) if value is not None}
        # buffered: a stream is read to its end (its contexts popped) before the next request
        return self.app(step).test_client().open(
            step.path, method=step.method, data=step.body, headers=headers,
            environ_overrides={"REMOTE_ADDR": step.ip}, buffered=True)

    def edge_counts(self, *ips: str) -> list[int]:
        """Each address's edge count as far as it decides anything: past the limit Flask
        counts a refused bad request, the door none (the window ends when it ends)."""
        engine = self.limiter.engine
        return [min(EDGE_LIMIT, int(self.db.get(k) or 0))
                for ip in ips or IPS for k in engine.edge_keys(ip)]

    def resync(self, ip: str) -> None:
        """Count at the edge the bad request this side refused and the other counted."""
        decision = self.limiter.engine.charge_edge(ip)
        assert decision is not None and decision.allowed


def _door(app: Flask, remove: bool = False) -> Door:
    """The app's Door; ``remove``: taken out of its WSGI chain (each middleware holds the
    next as .app or .wsgi_app), so Flask answers everything itself."""
    holder: Any = app
    while True:
        name = "wsgi_app" if hasattr(holder, "wsgi_app") else "app"
        inner = getattr(holder, name)
        if isinstance(inner, Door):
            if remove:
                setattr(holder, name, inner.wsgi_app)
            return inner
        holder = inner


@pytest.fixture(scope="module")
def sides(tmp_path_factory: pytest.TempPathFactory, redis_url: str
          ) -> Iterator[tuple[Side, Side, list[Door]]]:
    path = write_policy(tmp_path_factory.mktemp("door-diff"), POLICY)
    made: list[Side] = []
    with pytest.MonkeyPatch.context() as mp:
        for name in ENV_UNSET:
            mp.delenv(name, raising=False)
        for db in (1, 2):
            # Not TESTING: errors take the production path (handlers, not propagation).
            config = {"REDIS_URL": f"{redis_url}/{db}", "LIMITS_CONFIG": path}
            side = Side(create_app(config), create_app({**config, "REQUIRE_API_KEY": "1"}),
                        redis.Redis.from_url(f"{redis_url}/{db}"))
            for app in (side.plain, side.keyed):
                app.before_request(lambda seen=side.reached: seen.append(""))
                app.extensions["llm_limiter"].deny.max_stale = HOLD
            made.append(side)
        for app in (made[1].plain, made[1].keyed):
            _door(app, remove=True)
        yield made[0], made[1], [_door(made[0].plain), _door(made[0].keyed)]
    for side in made:
        side.db.flushdb()
        side.db.close()


# --- the requests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cast:
    """One sequence's few callers, so that they are held soon and the door has work."""

    users: list[str]
    keys: list[str]
    ips: list[str]


@st.composite
def casts(draw: st.DrawFn) -> Cast:
    def few(pool: list[str], most: int) -> list[str]:
        return draw(st.lists(st.sampled_from(pool), min_size=1, max_size=most, unique=True))

    return Cast(few(BODY_USERS, 2), few(KEY_REFS, 3), few(IPS, 3))


def _encoded(draw: st.DrawFn, good: dict[str, Any], wrongs: dict[str, Any]) -> bytes:
    """``good`` as JSON mostly; else with one field wrong, or hostile bytes made from it."""
    kind = draw(st.sampled_from(["good"] * 6 + ["wrong", "wrong", "hostile"]))
    if kind == "good":
        return json.dumps(good).encode()
    if kind == "wrong":
        return json.dumps(draw(one_wrong(good, wrongs)), default=str).encode()
    return draw(body_bytes(st.just(good)))


@st.composite
def steps(draw: st.DrawFn, cast: Cast) -> Step:
    route = draw(st.sampled_from(["chat"] * 4 + ["keyed"] * 2 + ["openai"] * 3 +
                                 ["anthropic"] * 3 + ["other", "revoke"]))
    if route == "revoke":
        return Step("revoke", "", "", bearer=draw(st.sampled_from(["kim", "qu"])))
    # The first choice is Hypothesis's favourite: a caller, not their absence.
    key = draw(st.sampled_from([*cast.keys, *cast.keys, None]))
    way = draw(st.sampled_from(["bearer"] * 3 + ["x-api-key", "both", "scheme"]))
    bearer, x_api_key, scheme = {
        "bearer": (key, None, "Bearer"), "x-api-key": (None, key, "Bearer"),
        "both": (key, draw(st.sampled_from(KEY_REFS)), "Bearer"),
        "scheme": (key, None, draw(st.sampled_from(["bearer", "BEARER", "Token", "Basic"]))),
    }[way] if key is not None else (None, None, "Bearer")
    message = draw(st.sampled_from(MESSAGES))
    method = "POST"
    if route in ("chat", "keyed", "other"):
        good: dict[str, Any] = {"message": message}
        user = draw(st.sampled_from([*cast.users * 3, None]) if route != "keyed"
                    else st.sampled_from([None, None, "kim", "ann", "bob"]))
        if user is not None:
            good["user_id"] = user
        if draw(st.booleans()):
            good["model"] = draw(st.sampled_from(["echo", "echo", "echo", "no-such-model"]))
        body = _encoded(draw, good, {"message": st.sampled_from(MESSAGES), "model": MODELS,
                                     "user_id": st.sampled_from(cast.users)})
        path = "/chat"
        if route == "other":   # no route of the door's: Flask's own answer, always
            method, path = draw(st.sampled_from([
                ("OPTIONS", "/chat"), ("OPTIONS", "/v1/messages"), ("GET", "/chat"),
                ("PUT", "/v1/chat/completions"), ("POST", "/chat/"), ("POST", "/CHAT"),
                ("POST", "/v1/chat/completions/"), ("POST", "/nope"), ("HEAD", "/chat")]))
    else:
        good = {"model": "echo", "messages": [{"role": "user", "content": message}]}
        if route == "anthropic" or draw(st.booleans()):
            good["max_tokens"] = draw(st.sampled_from([64, 2]))
        if draw(st.integers(0, 5)) == 0:
            good["stream"] = True
        body = _encoded(draw, good, {"messages": st.just([]), "max_tokens": st.just(0),
                                     "model": MODELS, "stream": st.just("yes"),
                                     "bogus": st.just(1)})
        path = "/v1/chat/completions" if route == "openai" else "/v1/messages"
    max_wait = draw(st.sampled_from(MAX_WAITS))
    if max_wait is None and (b"pat" in body or "pat".encode("utf-16-le") in body
                             or "pat" in (bearer, x_api_key)):
        max_wait = "0"   # a patient caller is told not to wait for its slot, nor to sleep here
    return Step(route, method, path, draw(st.sampled_from(cast.ips)), body, bearer, scheme,
                x_api_key, max_wait,
                draw(st.sampled_from(["application/json"] * 6 + [None, "text/plain"])),
                route == "keyed" or (route != "chat" and draw(st.booleans())))


sequences = casts().flatmap(lambda cast: st.lists(steps(cast), min_size=15, max_size=50))


# --- comparing ----------------------------------------------------------------------------------


def _masked(resp: TestResponse) -> str:
    text = resp.get_data(as_text=True)
    if resp.mimetype == "application/json":
        with contextlib.suppress(ValueError):
            text = json.dumps(json.loads(text), sort_keys=True)
    text = re.sub(r'"id": ?"[^"]*"', '"id": "ID"', text)   # the echo model's random ids
    return re.sub(r"\d+", "N", text)


def _headers(resp: TestResponse) -> set[str]:
    """The rate-limit headers' names. (Their values may differ by design: an IP's edge entry
    keeps the decision that was refused, with that plan's layers, for whoever comes next.)"""
    return {name.lower() for name, _ in resp.headers.items() if COMPARED.match(name)}


def _layer(resp: TestResponse) -> str | None:
    """The layer a 429 names, in any of the three error shapes."""
    found = re.search(r"exceeded \(([^)]+)\)", resp.get_data(as_text=True))
    return found.group(1) if found else None


def _unlayered(resp: TestResponse) -> str:
    """The masked body without the name of the layer that refused."""
    layer = _layer(resp)
    return _masked(resp).replace(f"({layer})", "(L)").replace(f'"{layer}"', '"L"')


def _caller(step: Step) -> tuple[str, str, str | None] | None:
    """(realm, user, key plan) the route names by its own reading of the request, or None."""
    if step.route == "chat":
        try:
            user = json.loads(step.body or b"").get("user_id")
        except (ValueError, AttributeError, RecursionError):
            return None
        return (BODY_USER, user, None) if isinstance(user, str) else None
    if step.route == "anthropic" and step.x_api_key is not None:
        ref = step.x_api_key
    elif step.scheme.lower() == "bearer" and step.bearer is not None:
        ref = step.bearer
    else:   # /chat reads X-API-Key after Bearer; OpenAI's clients send Bearer only
        ref = step.x_api_key if step.route == "keyed" else None
    return (KEY_USER, *KEYS[ref]) if ref in KEYS else None


def _edge_held(side: Side, step: Step) -> bool:
    return EDGE_LIMIT in side.edge_counts(step.ip)


def _caller_held(side: Side, step: Step) -> bool:
    """Would the store refuse a well-formed request of this caller now, past its patience?
    (A refused call charges nothing; one admitted fails the test anyway.)"""
    named = _caller(step)
    if named is None:
        return False
    realm, user, key_plan = named
    engine = side.limiter.engine
    resolved = engine.policy.resolve(user, key_plan, realm)
    decision = engine.acquire(user, None, resolved, realm)
    return not decision.allowed and (decision.wait or 0) > resolved.max_wait_seconds


def _impatient_entry(side: Side, step: Step) -> bool:
    """Does this step's app hold a refusal of a patient caller that it may not answer (its
    wait within the plan's patience)? Asked without a probe: it changes nothing."""
    named, limiter = _caller(step), side.app(step).extensions["llm_limiter"]
    resolved = named and limiter.policy.resolve(named[1], named[2], named[0])
    return bool(resolved and resolved.max_wait_seconds > 0 and limiter.deny.caller(
        named[1], named[0], resolved, 0.0, probe=False) is not None)


def _echo_checked(step: Step, resp: TestResponse) -> None:
    """A 200 answers the message this request sent (as Flask parses it)."""
    try:
        sent = json.loads(step.body or b"")
    except (ValueError, RecursionError):
        return
    if step.route in ("chat", "keyed"):
        message, most = sent.get("message"), 1024   # the plans' default_max_tokens
    else:
        message, most = sent["messages"][-1].get("content"), sent.get("max_tokens") or 1024
    if not isinstance(message, str):
        return
    if resp.mimetype == "text/event-stream":
        got = ""
        for line in resp.get_data(as_text=True).splitlines():
            event = json.loads(line[6:]) if line.startswith("data: {") else {}
            got += (event["choices"][0]["delta"].get("content") if event.get("choices")
                    else event.get("delta", {}).get("text")) or ""
    elif step.route in ("chat", "keyed"):
        got = resp.get_json()["reply"]
    elif step.route == "openai":
        got = resp.get_json()["choices"][0]["message"]["content"]
    else:
        got = resp.get_json()["content"][0]["text"]
    assert got == " ".join(("echo: " + message).split()[:most]), (step, got[:200])


def _compare(door: Side, bypass: Side, step: Step, history: list[str]) -> None:
    seen, impatient = len(door.reached), _impatient_entry(door, step)
    a, b = door.send(step), bypass.send(step)
    answered = len(door.reached) == seen
    SEEN[f"door {step.route}"] += answered
    SEEN["patience kept"] += impatient and not answered
    where = (f"{step!r:.600}\n  door: {a.status} {a.get_data()[:300]!r}\n  "
             f"flask: {b.status} {b.get_data()[:300]!r}\n  after: {history[-8:]}")
    history.append(f"{step.route} {step.path} {step.ip} -> {a.status_code}")
    assert a.status_code < 500 and b.status_code < 500, where
    if a.status_code == b.status_code == 429 and _masked(a) != _masked(b):
        # Held twice, at the edge and as a caller: the door names the refusal it holds (as
        # Flask's deny cache would), where Flask, finding fault with the request first,
        # counts it at the edge and names the edge's.
        assert "edge" in (_layer(a), _layer(b)) and _layer(a) != _layer(b), where
        assert _edge_held(bypass, step) and _caller_held(bypass, step), where
        assert _unlayered(a) == _unlayered(b), where
        SEEN["held twice"] += 1
    elif a.status_code == b.status_code:
        assert _masked(a) == _masked(b), where
        assert _headers(a) == _headers(b), where
        if a.status_code == 200 and step.method == "POST":
            _echo_checked(step, a)
            _echo_checked(step, b)
    else:
        # A held caller's 429 before Flask finds fault with the request. (The other way
        # round only by the timing of Flask's own deny cache, which answers a held caller
        # before it reads X-RateLimit-Max-Wait, where the store is asked after.)
        statuses = {a.status_code, b.status_code}
        assert 429 in statuses and statuses - {429} <= ALLOWED, where
        assert (answered if a.status_code == 429 else True) or step.max_wait is not None, where
        assert step.route != "other", where
        assert _edge_held(bypass, step) or _caller_held(bypass, step), f"not held: {where}"
        (door if a.status_code == 429 else bypass).resync(step.ip)
        SEEN[f"liberty {a.status_code}/{b.status_code}"] += 1
    assert door.edge_counts() == bypass.edge_counts(), where


@given(sequences)
@fuzz(EXAMPLES)
def _answered_alike(sides: tuple[Side, Side, list[Door]], requests: list[Step]) -> None:
    door, bypass, doors = sides
    door.reset()
    bypass.reset()
    history: list[str] = []
    for step in requests:
        if step.route == "revoke":
            for side in (door, bypass):
                side.limiter.keys.revoke(side.keys[step.bearer or ""])
            history.append(f"revoke {step.bearer}")
        else:
            _compare(door, bypass, step, history)
    assert not any(d._failed for d in doors), "a door failed and handed its request on"
    SEEN["examples"] += 1


@pytest.mark.slow
def test_the_door_answers_as_flask_would(sides: tuple[Side, Side, list[Door]]) -> None:
    """Every sequence is answered alike with and without the door; then, in the same test
    (so no worker or order can part them), the comparison is shown to be only as good as
    the door's work: it answered on every opted-in route, took its liberty, and kept a
    patient caller's patience."""
    SEEN.clear()
    _answered_alike(sides=sides)
    print(dict(sorted(SEEN.items())))
    assert SEEN["examples"] >= EXAMPLES
    for route in ("chat", "keyed", "openai", "anthropic"):
        assert SEEN[f"door {route}"] >= 1, route
    assert sum(SEEN[f"door {r}"] for r in ("chat", "openai", "anthropic")) >= 100
    assert SEEN["door other"] == 0
    assert sum(n for k, n in SEEN.items() if k.startswith("liberty")) >= 10
    assert SEEN["patience kept"] >= 5


def test_an_entry_come_due_is_asked_on_both_sides_alike(
        sides: tuple[Side, Side, list[Door]]) -> None:
    """With production's second: an entry come due is not answered at the door but handed on,
    and Flask's path asks the store — which counts the edge, refusing — as the app without a
    door does; the store's refusal renews the entry, which then answers at the door again."""
    door, bypass, _ = sides
    caches = [side.limiter.deny for side in (door, bypass)]
    step = Step("chat", "POST", "/chat", "10.0.0.3",
                b'{"message": "hello", "user_id": "qu", "model": "echo"}')
    door.reset()
    bypass.reset()
    try:
        for deny in caches:
            deny.max_stale = MAX_STALE
        answers = [(door.send(step).status_code, bypass.send(step).status_code)
                   for _ in range(3)]
        assert answers == [(200, 200), (200, 200), (429, 429)]
        assert door.edge_counts(step.ip) == bypass.edge_counts(step.ip) == [3]
        for deny in caches:   # past the probe's moment, before the store's wait ends
            deny.clock = lambda: time.perf_counter() + MAX_STALE - PROBE_SECONDS / 2
        seen = len(door.reached)
        a, b = door.send(step), bypass.send(step)
        assert a.status_code == b.status_code == 429 and _masked(a) == _masked(b)
        assert len(door.reached) == seen + 1, "the door handed the due entry on"
        assert door.edge_counts(step.ip) == bypass.edge_counts(step.ip) == [4]
        for deny in caches:
            deny.clock = time.perf_counter
        seen = len(door.reached)
        a, b = door.send(step), bypass.send(step)
        assert a.status_code == b.status_code == 429 and _masked(a) == _masked(b)
        assert len(door.reached) == seen, "renewed: answered at the door"
        assert door.edge_counts(step.ip) == bypass.edge_counts(step.ip) == [4]
    finally:
        for deny in caches:
            deny.clock = time.perf_counter
            deny.max_stale = HOLD
