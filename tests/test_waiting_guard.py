"""Waiting on the model's upstream guard, end to end: gunicorn x4 (gevent) in front of the fake
provider, the real openai SDK through /v1. A call the guard's request window or the provider's
learnt pacing would refuse, with a wait within the plan's max_wait_seconds, is admitted into
its future slot and served then; one whose slot lies past the deadline is refused at once
(upstream_saturated, an honest Retry-After) and charges the user nothing; a waiter that hangs
up gives its guard slot back.

A guard window is a minute long. So that a test sees it free up within seconds, the window is
written as a minute of traffic would have left it (:func:`aged_window`): full now, one request
leaving it at each of the next whole seconds of the store's clock. Everything after that is
the app's own doing. No timing asserts beyond loose bounds, except that nothing reaches the
provider before its slot (the guarantee under test).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import openai
import pytest
import redis
from flask import Flask

from app import create_app
from fakeprovider import FakeProvider
from limiting import current_limiter
from limiting.core.upstream import guard_layers, model_prefix
from tests.clocked import SLOTS, decode_window, window_tail
from tests.conftest import Gunicorn, keyed_app
from tests.policies import LOADED, plan, policy, served_by

SPACED, FULL, HANGUP, PACED = "gpt-spaced", "gpt-full", "gpt-hangup", "gpt-paced"
MAX_WAIT = 5
# What a loaded box may add to a call beyond its wait: far below the 30-60 s a wrong wait costs.
SLOW_BOX = 20
USERS = {"spaced": "w", "full": "w", "hangup": "w", "paced": "w"}
POLICY = policy(
    per_ip="100000 per 10 seconds", default="w", store=LOADED,
    # The user's own layers never bind here: only the model's guard makes anyone wait.
    plans={"w": plan(100, 100, "1000 per day", max_wait_seconds=MAX_WAIT)},
    models={SPACED: served_by("openai", requests_per_minute=3),
            FULL: served_by("openai", requests_per_minute=3),
            HANGUP: served_by("openai", requests_per_minute=1),
            PACED: served_by("openai")})   # no windows: only the provider's learnt pacing
HELLO = [{"role": "user", "content": "hello"}]


@dataclass
class Served:
    server: Gunicorn
    fake: FakeProvider      # what the provider received
    keys: dict[str, str]    # user -> API key
    operator: Flask         # the same store and policy in-process, as an operator's CLI
    store: redis.Redis


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Served]:
    store = redis.Redis.from_url(redis_url)
    store.flushall()
    folder = tmp_path_factory.mktemp("waiting-guard")
    (folder / "limits.toml").write_text(POLICY)
    env = {"REDIS_URL": redis_url, "LIMITS_CONFIG": str(folder / "limits.toml")}
    with keyed_app(folder, env, USERS, workers=4) as (server, fake, keys):
        yield Served(server, fake, keys, create_app(env), store)
    store.close()


def guard_key(served: Served, model: str) -> str:
    """The store key of ``model``'s guard request window."""
    with served.operator.app_context():
        limiter = current_limiter()
        layer = guard_layers(model, limiter.policy.model(model))[0]
        assert layer.name == "upstream-requests"
        return model_prefix(limiter.engine.namespace, model) + layer.suffix


def aged_window(served: Served, model: str, limit: int, first: int = 0) -> list[int]:
    """Fill ``model``'s guard request window as ``limit`` requests made a minute ago, one a
    second, would have left it: the window is full now, and a unit leaves it at each of the
    next ``limit`` whole seconds of the store's clock from ``first + 1`` seconds on (a slot k
    leaves when the current slot is k + 61: acquire.lua's ring of 61 one-second slots).
    Returns those moments, in unix seconds (the store's clock is this machine's)."""
    sec, _ = served.store.time()
    ring = [0] * SLOTS
    for j in range(limit):
        ring[(sec - SLOTS + 1 + first + j) % SLOTS] = 1
    state = struct.pack("<dd", sec, limit) + struct.pack(f"<{SLOTS}I", *ring)
    served.store.set(guard_key(served, model), state, px=70_000)
    return [sec + 1 + first + j for j in range(limit)]


def guard_remaining(served: Served, model: str) -> int:
    """The guard's request window's remaining, as the usage page reads it (charges nothing)."""
    with served.operator.app_context():
        decision = current_limiter().engine.peek_model(model)
    (state,) = [s for s in decision.states if s.layer.name == "upstream-requests"]
    return state.remaining


def quota_left(served: Served, user: str) -> int:
    """The user's quota-day remaining, as `flask limits show USER` prints it."""
    shown = served.operator.test_cli_runner().invoke(args=["limits", "show", user])
    assert shown.exit_code == 0, shown.output
    (row,) = [line.split() for line in shown.output.splitlines()
              if line.startswith("quota-day")]
    return int(row[2])


class Arrivals:
    """When requests reached the fake provider (unix seconds), sampled every few ms: a sample
    is never earlier than the arrival it sees, so "no sooner than" checks stay sound."""

    def __init__(self, fake: FakeProvider) -> None:
        self.fake = fake
        self.base = len(fake.requests)
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Arrivals:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self._sample()

    def _sample(self) -> None:
        seen = len(self.fake.requests) - self.base
        now = time.time()
        while len(self.times) < seen:
            self.times.append(now)


def sdk_calls(served: Served, user: str, model: str, n: int,
              headers: dict[str, str] | None = None) -> list[tuple[float, object]]:
    """``n`` concurrent chat completions with the openai SDK: (seconds to answer, the
    completion or the RateLimitError), in completion order."""
    oai = openai.OpenAI(base_url=served.server.url + "/v1", api_key=served.keys[user],
                        max_retries=0, timeout=30, default_headers=headers or {})
    start = time.monotonic()

    def one(_: int) -> tuple[float, object]:
        try:
            out: object = oai.chat.completions.create(model=model, messages=HELLO)
        except openai.RateLimitError as exc:
            out = exc
        return time.monotonic() - start, out

    # Closed after: an idle keep-alive connection would hold gunicorn's graceful stop.
    with oai, ThreadPoolExecutor(n) as pool:
        return sorted(pool.map(one, range(n)), key=lambda answer: answer[0])


def refused(answers: list[tuple[float, object]]) -> list[tuple[float, openai.RateLimitError]]:
    return [(t, out) for t, out in answers if isinstance(out, openai.RateLimitError)]


def assert_saturated(exc: openai.RateLimitError, least: int, most: int) -> None:
    """The guard's refusal: upstream_saturated, Retry-After the honest wait."""
    assert exc.code == "upstream_saturated", exc.body
    assert least <= int(exc.response.headers["Retry-After"]) <= most, exc.response.headers


@pytest.mark.slow
def test_calls_beyond_the_guards_limit_wait_for_its_slots(served: Served) -> None:
    """3 per minute, the window full: 3 concurrent calls are each served when a slot frees,
    a second apart, none sooner; a fourth and fifth, whose slot is a minute away, are refused
    at once and charge the user nothing."""
    left = quota_left(served, "spaced")
    frees = aged_window(served, SPACED, 3)
    with Arrivals(served.fake) as arrivals:
        answers = sdk_calls(served, "spaced", SPACED, 5)
    served_at = [t for t, out in answers if not isinstance(out, Exception)]
    assert len(served_at) == 3, answers
    # Provider side: exactly the 3 admitted calls, each no sooner than the request it
    # replaces left the window (20 ms for clock noise): no minute ever held more than 3.
    assert len(arrivals.times) == 3
    for arrived, free in zip(arrivals.times, frees, strict=True):
        assert arrived >= free - 0.02, (arrivals.times, frees)
    # Served in their own slots, not a minute later in the next window's: the bound leaves a
    # loaded box its time (5 SDK calls under two CPU hogs once took 8.3 s) and is still far
    # from the 55 s a call served in the next free slot would take.
    assert max(served_at) < MAX_WAIT + SLOW_BOX
    for t, exc in refused(answers):
        # At once, not after the deadline: a refusal that had waited would come back no sooner
        # than MAX_WAIT after its call was sent (after ``start``). Under 2 s on a quick box.
        assert t < MAX_WAIT, t
        assert_saturated(exc, 55, 63)             # the next free slot: a minute away
    # The store: the 3 served requests, each charged no sooner than the slot its old request
    # left (in the ring, or in the tail of waiters' slots ahead of it); the old minute gone.
    # On a quick box that is one in each of the 3 slots; on a loaded one a call decided after
    # a slot had passed runs at once and is charged in the slot it runs in.
    raw = served.store.get(guard_key(served, SPACED))
    last, _, ring = decode_window(raw, wide=False)
    now_slot = served.store.time()[0]
    held = {k: ring[k % SLOTS] for k in range(int(last) - SLOTS + 1, int(last) + 1)
            if ring[k % SLOTS] and k > now_slot - SLOTS}
    held |= window_tail(raw)
    charged = sorted(slot for slot, count in held.items() for _ in range(int(count)))
    assert len(charged) == 3, (held, frees)
    assert all(at >= free for at, free in zip(charged, frees, strict=True)), (held, frees)
    assert quota_left(served, "spaced") == left - 3


@pytest.mark.slow
def test_a_slot_past_the_deadline_is_refused_at_once_and_charges_nothing(
        served: Served) -> None:
    """A fresh window: 3 calls pass now; the next 3 would wait a minute for theirs, past the
    plan's 5 s, and are refused at once, charging neither the user nor the guard."""
    left = quota_left(served, "full")
    assert [isinstance(out, Exception) for _, out in sdk_calls(served, "full", FULL, 3)] \
        == [False] * 3
    with Arrivals(served.fake) as arrivals:
        answers = sdk_calls(served, "full", FULL, 3)
    assert len(refused(answers)) == 3 and arrivals.times == []
    for t, exc in refused(answers):
        assert t < MAX_WAIT, t    # at once: one that waited would be back MAX_WAIT later
        assert_saturated(exc, 55, 63)
    assert quota_left(served, "full") == left - 3
    assert guard_remaining(served, FULL) == 0
    _, total, _ = decode_window(served.store.get(guard_key(served, FULL)), wide=False)
    assert total == 3


def _raw_call(served: Served, user: str, model: str) -> socket.socket:
    body = json.dumps({"model": model, "messages": HELLO}).encode()
    sock = socket.create_connection(("127.0.0.1", served.server.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer " + served.keys[user].encode() + b"\r\n"
                 b"Content-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


@pytest.mark.slow
def test_a_waiter_that_hangs_up_gives_its_guard_slot_back(served: Served) -> None:
    """1 per minute, its one request leaving the window in 3-4 s: a waiter admitted into that
    slot hangs up; the slot is the guard's again (and the user's charge is back), so the next
    caller is served in it instead of being refused for a minute."""
    left = quota_left(served, "hangup")
    (free,) = aged_window(served, HANGUP, 1, first=3)
    with Arrivals(served.fake) as arrivals:
        sock = _raw_call(served, "hangup", HANGUP)
        deadline = time.monotonic() + 30    # a loaded box's bound
        while quota_left(served, "hangup") == left:   # admitted: charged, and waiting
            assert time.monotonic() < deadline, "the waiter was never admitted"
            time.sleep(0.05)
        sock.close()
        deadline = time.monotonic() + 5
        # Seen within a poll (0.25 s), well before the slot (3 s away at least).
        while guard_remaining(served, HANGUP) == 0:          # the guard's slot is back
            assert time.monotonic() < deadline, "the guard's slot was never given back"
            time.sleep(0.05)
        assert guard_remaining(served, HANGUP) == 1
        assert quota_left(served, "hangup") == left         # and the user's charge
        # The next caller gets that slot: served when the old request leaves, not refused.
        (answer,) = sdk_calls(served, "hangup", HANGUP, 1)
        assert not isinstance(answer[1], Exception), answer
    assert len(arrivals.times) == 1 and arrivals.times[0] >= free - 0.02
    assert served.server.log.read_text().count('"abandoned_wait"') == 1
    assert quota_left(served, "hangup") == left - 1


@pytest.mark.slow
def test_calls_wait_for_the_providers_reset_it_announced(served: Served) -> None:
    """The provider says no request is left until its window resets in 2 s: the next calls
    wait for the reset and are all served (pacing charges no slot ahead: they go together);
    when it says 30 s, past the plan's 5, a call is refused at once and charges nothing."""
    fake = served.fake
    set_headers = fake.set_ratelimit_headers
    try:
        set_headers(remaining_requests=0, reset_requests=2.0)
        sent = time.time()
        assert not isinstance(sdk_calls(served, "paced", PACED, 1)[0][1], Exception)
        with Arrivals(fake) as arrivals:
            answers = sdk_calls(served, "paced", PACED, 4)
        assert not refused(answers), answers
        assert len(arrivals.times) == 4
        assert min(arrivals.times) >= sent + 2.0 - 0.05, (arrivals.times, sent)
        assert max(t for t, _ in answers) < MAX_WAIT + SLOW_BOX   # served at the 2 s reset
        # Now the provider's reset is 30 s away: past the deadline.
        set_headers(remaining_requests=0, reset_requests=30.0)
        sdk_calls(served, "paced", PACED, 1)     # waits out the last 2 s; learns the 30
        left = quota_left(served, "paced")
        with Arrivals(fake) as arrivals:
            answers = sdk_calls(served, "paced", PACED, 2)
        assert len(refused(answers)) == 2 and arrivals.times == []
        for t, exc in refused(answers):
            assert t < MAX_WAIT, t    # at once: one that waited would be back MAX_WAIT later
            assert_saturated(exc, 25, 31)
        assert quota_left(served, "paced") == left
    finally:
        set_headers()
