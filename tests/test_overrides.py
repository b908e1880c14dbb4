"""`flask limits set|unset|overrides`: stored in the store, applied by Policy.resolve in every
worker within a second, usage carried over, bad input refused with a clear error."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
from flask import Flask

from app import create_app
from limiting.core.naming import BODY_USER
from limiting.core.override import Override
from limiting.overrides import REFRESH_SECONDS, OverrideTable, StoreOverrides
from limiting.stores.memory import MemoryStore
from tests.conftest import free_port, write_policy
from tests.policies import LOADED, plan, policy

POLICY = policy(store=LOADED, per_ip="100000 per minute",
                plans={"starter": plan(1000, 1000, "5 per day"),
                       "pro": plan(1000, 1000, "2000 per day")})
# For the workers under load: nothing refuses, the quota in the headers tells the plans apart.
ROOMY = policy(store=LOADED, per_ip="100000 per minute",
               plans={"starter": plan(10**6, 10**6, "100000 per day"),
                      "pro": plan(10**6, 10**6, "200000 per day")})


def _app(url: str, tmp_path: Path, text: str = POLICY) -> Flask:
    return create_app({"REDIS_URL": url, "LIMITS_CONFIG": write_policy(tmp_path, text),
                       "TESTING": True})


@pytest.fixture(params=["redis", "memory"])
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Flask:
    if request.param == "redis":
        request.getfixturevalue("r")
        return _app(request.getfixturevalue("redis_url"), tmp_path)
    return _app("memory://", tmp_path)


def _chat(client: object, user: str) -> tuple[int, str]:
    resp = client.post("/chat", json={"message": "hi", "user_id": user})  # type: ignore[attr-defined]
    return resp.status_code, resp.headers.get("RateLimit-Policy", "")


def test_set_list_and_clear(app: Flask) -> None:
    cli = app.test_cli_runner()
    made = cli.invoke(args=["limits", "set", "alice", "--plan", "pro", "--quota", "500 per day",
                            "--quota", "50 per hour", "--for", "7d"])
    assert made.exit_code == 0, made.output
    assert "plan=pro" in made.stdout and "within 1 s" in made.stdout
    listed = cli.invoke(args=["limits", "overrides"])
    assert "alice" in listed.stdout and "chat" in listed.stdout   # no key: the /chat user_id
    rows = json.loads(cli.invoke(args=["limits", "overrides", "--json"]).stdout)
    assert [(r["user"], r["namespace"]) for r in rows] == [("alice", "chat")]
    assert rows[0]["what"] == "plan=pro quota='500 per day' quota='50 per hour'"
    assert rows[0]["expires_at"].endswith("Z") and rows[0]["set_at"].endswith("Z")
    shown = cli.invoke(args=["limits", "show", "alice"]).stdout
    assert "pro+override:b:alice" in shown and "quota-hour" in shown

    assert cli.invoke(args=["limits", "overrides", "--clear", "alice"]).exit_code == 0
    assert cli.invoke(args=["limits", "overrides"]).stdout.strip().endswith("(no overrides)")
    assert cli.invoke(args=["limits", "unset", "alice"]).exit_code == 1   # nothing left
    # Both changes are in the audit trail, as the shell user, with before and after.
    trail = cli.invoke(args=["audit"])
    assert trail.exit_code == 0, trail.output
    assert "limits.set" in trail.stdout and "limits.unset" in trail.stdout
    assert "b:alice" in trail.stdout and "plan=pro" in trail.stdout


def test_an_override_quota_keeps_the_usage_already_spent(app: Flask) -> None:
    client, cli = app.test_client(), app.test_cli_runner()
    assert [_chat(client, "spender")[0] for _ in range(6)] == [200] * 5 + [429]
    set_ = cli.invoke(args=["limits", "set", "spender", "--quota", "8 per day"])
    assert set_.exit_code == 0, set_.output
    # 5 spent under "5 per day" stay spent under "8 per day": three more, not eight.
    answers = [_chat(client, "spender") for _ in range(4)]
    assert [code for code, _ in answers] == [200, 200, 200, 429]
    assert '"quota-day";q=8' in answers[0][1]
    assert _chat(client, "someone-else")[1].count('"quota-day";q=5') == 1   # only spender's
    assert cli.invoke(args=["limits", "unset", "spender"]).exit_code == 0
    assert _chat(client, "spender")[0] == 429   # 8 spent, back on 5 per day


def test_an_override_for_a_while_expires_by_itself(app: Flask) -> None:
    client, cli = app.test_client(), app.test_cli_runner()
    made = cli.invoke(args=["limits", "set", "brief", "--quota", "1 per day", "--for", "2s"])
    assert made.exit_code == 0, made.output
    assert [_chat(client, "brief")[0] for _ in range(2)] == [200, 429]
    deadline = time.monotonic() + 20
    while _chat(client, "brief")[0] == 429:   # eventually, within a bounded wait
        assert time.monotonic() < deadline, "the override did not expire"
        time.sleep(0.2)
    assert '"quota-day";q=5' in _chat(client, "brief")[1]
    assert cli.invoke(args=["limits", "overrides", "--json"]).stdout.strip() == "[]"


@pytest.mark.parametrize(("args", "says"), [
    (["--plan", "gold"], "unknown plan 'gold'"),
    (["--quota", "lots per day"], "bad quota 'lots per day'"),
    (["--quota", "5 per day", "--quota", "9 per day"], "share one window"),
    (["--quota", "5 per day", "--for", "soon"], "bad duration 'soon'"),
    (["--quota", "5 per day", "--for", "0d"], "bad duration"),
    (["--budget-usd-per-day", "-1"], "positive"),
    ([], "nothing to set"),
])
def test_bad_input_is_a_clear_error_and_nothing_is_stored(app: Flask, args: list[str],
                                                          says: str) -> None:
    cli = app.test_cli_runner()
    result = cli.invoke(args=["limits", "set", "carol", *args])
    assert result.exit_code == 2 and says in result.stderr and "Traceback" not in result.output
    assert result.stdout == ""
    assert cli.invoke(args=["limits", "overrides", "--json"]).stdout.strip() == "[]"


def test_unreachable_store_exits_2(tmp_path: Path) -> None:
    cli = _app(f"redis://127.0.0.1:{free_port()}", tmp_path).test_cli_runner()
    for args in (["set", "dave", "--plan", "pro"], ["overrides"], ["unset", "dave"]):
        result = cli.invoke(args=["limits", *args])
        assert result.exit_code == 2 and "unreachable" in result.stderr, (args, result.output)


def test_key_user_and_chat_user_id_keep_their_own_overrides(app: Flask) -> None:
    client, cli = app.test_client(), app.test_cli_runner()
    assert cli.invoke(args=["keys", "create", "erin"]).exit_code == 0
    # erin holds a live key: `set erin` means the key user, as `show` and `reset` do.
    assert cli.invoke(args=["limits", "set", "erin", "--quota", "7 per day"]).exit_code == 0
    rows = json.loads(cli.invoke(args=["limits", "overrides", "--json"]).stdout)
    assert [(r["user"], r["namespace"]) for r in rows] == [("erin", "key")]
    assert '"quota-day";q=5' in _chat(client, "erin")[1]   # anyone typing "erin" in /chat
    assert cli.invoke(args=["limits", "set", "erin", "--anonymous", "--quota", "3 per day"]
                      ).exit_code == 0
    assert '"quota-day";q=3' in _chat(client, "erin")[1]
    assert cli.invoke(args=["limits", "unset", "erin", "--key-user"]).exit_code == 0
    rows = json.loads(cli.invoke(args=["limits", "overrides", "--json"]).stdout)
    assert [(r["user"], r["namespace"]) for r in rows] == [("erin", "chat")]


def test_a_worker_asks_the_store_at_most_once_a_second_and_compiles_once(tmp_path: Path
                                                                          ) -> None:
    app = _app("memory://", tmp_path)
    limiter = app.extensions["llm_limiter"]
    store = limiter.store
    assert isinstance(store, MemoryStore)
    now = [1000.0]
    reads: list[int] = []

    class Counted(OverrideTable):
        def version(self) -> int:
            reads.append(1)
            return super().version()

    source = StoreOverrides(Counted(store), clock=lambda: now[0])
    policy = limiter.policy
    plans = policy.plans
    starter = plans["starter"]
    OverrideTable(store).put(BODY_USER, "frank", Override(quotas=("9 per day",)))
    first = source.plan_for("frank", BODY_USER, starter, plans)
    for _ in range(1000):
        assert source.plan_for("frank", BODY_USER, starter, plans) is first
        assert source.plan_for("grace", BODY_USER, starter, plans) is starter
    assert len(reads) == 0   # the first call read everything; no version check within 1 s
    now[0] += REFRESH_SECONDS
    assert source.plan_for("frank", BODY_USER, starter, plans) is first
    assert len(reads) == 1
    engine = limiter.engine
    assert engine.compiled(first) is engine.compiled(
        source.plan_for("frank", BODY_USER, starter, plans))


@pytest.fixture
def four_workers(gunicorn: Callable[..., object], tmp_path: Path, r: redis.Redis,
                 unix_url: str) -> object:
    return gunicorn(REDIS_URL=unix_url, LIMITS_CONFIG=write_policy(tmp_path, ROOMY),
                    WEB_CONCURRENCY="4", LIMITER_INSTANCE=str(tmp_path))


@pytest.mark.slow
def test_every_gunicorn_worker_sees_an_override_within_a_second(
        four_workers: object, tmp_path: Path, unix_url: str) -> None:
    url = four_workers.url  # type: ignore[attr-defined]
    cli = _app(unix_url, tmp_path, ROOMY).test_cli_runner()
    # 32 at once, each on a connection of its own (a client each: one shared by threads
    # that close their connections races), so every worker takes some.
    with ThreadPoolExecutor(32) as pool:
        pids: set[int] = set()
        started = time.monotonic()
        while len(pids) < 2:   # workers still booting answer nothing yet
            assert time.monotonic() - started < 60, f"one worker answers: {pids}"
            pids |= set(pool.map(lambda _: httpx.get(url + "/healthz").json()["worker"],
                                 range(64)))

        def round_of(user: str) -> list[str]:
            def one(_: int) -> str:
                resp = httpx.post(url + "/chat", json={"message": "hi", "user_id": user},
                                  timeout=30)
                assert resp.status_code == 200, resp.text
                return resp.headers["RateLimit-Policy"]
            return list(pool.map(one, range(32)))

        def all_see(text: str, user: str) -> None:
            """Eventually (bounded) three rounds in a row, over every worker, carry ``text``."""
            started, streak = time.monotonic(), 0
            while streak < 3:
                # A loaded box's bound (each worker reads overrides once a second).
                assert time.monotonic() - started < 60, "not seen by every worker"
                streak = streak + 1 if all(text in p for p in round_of(user)) else 0

        assert all('"quota-day";q=100000' in p for p in round_of("henry"))
        assert cli.invoke(args=["limits", "set", "henry", "--plan", "pro"]).exit_code == 0
        all_see('"quota-day";q=200000', "henry")
        assert cli.invoke(args=["limits", "unset", "henry"]).exit_code == 0
        all_see('"quota-day";q=100000', "henry")
