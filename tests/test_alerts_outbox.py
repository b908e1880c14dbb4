"""The alerts outbox (lua/alerts.lua and its memory:// mirror) and the webhook deliverer:
one event per crossing across threads, signed deliveries to a local receiver, retries with
the same id, a lease that keeps two deliverers from sending one event twice, and the hour
after which an event is dropped."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from limiting.alerts import GIVE_UP_AFTER, Alerts, StoreAlertBox
from limiting.core.alerting import Used, crossings, verify
from limiting.stores.storage import open_store
from limiting.stores.store import Store
from tests.webhooks import Receiver

SECRET = "whsec_test"


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        redis.Redis.from_url(url).flushall()
        opened = open_store(url, timeout=2.0)
    else:
        opened = open_store("memory://")
    try:
        yield opened
    finally:
        opened.close()


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def crossing(subject: str = "alice", threshold: float = 0.8, now: float = 1_800_000_000.0
             ) -> list[Any]:
    state = Used("quota-day", "w", 100, 86_400, 0, 25, 3600.0)   # 75 -> 100 of 100
    return crossings(subject, "user", [state], (threshold,), now)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    got = Receiver()
    try:
        yield got
    finally:
        got.close()


def test_many_workers_noticing_one_crossing_make_one_event(store: Store) -> None:
    box = StoreAlertBox(store, "rl:")
    clock = Clock()
    made = []

    def notice(_: int) -> int:
        alerts = Alerts(box, "http://127.0.0.1:9/unused", SECRET, clock=clock)
        return alerts.notice(crossing())

    with ThreadPoolExecutor(16) as pool:
        made = list(pool.map(notice, range(64)))
    assert sum(made) == 1
    assert len(box.outbox_due(clock.now, 30, 100)) == 1
    # Another threshold, another subject: events of their own.
    alerts = Alerts(box, None, None, clock=clock)
    assert alerts.notice(crossing(threshold=1.0)) == 1
    assert alerts.notice(crossing(subject="bob")) == 1


def test_delivery_is_signed_retried_with_the_same_id_and_done_once(
        store: Store, receiver: Receiver) -> None:
    box, clock = StoreAlertBox(store, "rl:"), Clock()
    receiver.statuses = [500, 503]
    alerts = Alerts(box, receiver.url, SECRET, clock=clock)
    assert alerts.notice(crossing()) == 1
    first = alerts.deliver_due()
    assert [d.ok for d in first] == [False]
    assert alerts.deliver_due() == []          # not due again yet (backoff)
    clock.now += 3
    assert [d.ok for d in alerts.deliver_due()] == [False]
    clock.now += 10
    done = alerts.deliver_due()
    assert [(d.ok, d.attempts) for d in done] == [(True, 3)]
    clock.now += 600
    assert alerts.deliver_due() == []          # delivered: gone from the outbox
    ids = {event["id"] for event, _, _ in receiver.got}
    assert len(receiver.got) == 3 and len(ids) == 1
    for event, header, body in receiver.got:
        assert verify(header, body, SECRET, now=int(clock.now) - 13, tolerance=600)
        assert event["type"] == "limit.threshold" and event["subject"] == "alice"
        assert event["threshold"] == 0.8 and event["used"] == 100 and event["limit"] == 100


def test_a_held_event_is_not_sent_by_another_deliverer_until_its_lease_ends(
        store: Store) -> None:
    box, clock = StoreAlertBox(store, "rl:"), Clock()
    Alerts(box, "http://x", None, clock=clock).notice(crossing())
    assert len(box.outbox_due(clock.now, 30, 10)) == 1
    assert box.outbox_due(clock.now + 29, 30, 10) == []
    again = box.outbox_due(clock.now + 31, 30, 10)
    assert len(again) == 1 and again[0][2] == 0


def test_an_unreachable_webhook_is_retried_for_an_hour_then_dropped(store: Store) -> None:
    box, clock = StoreAlertBox(store, "rl:"), Clock()
    alerts = Alerts(box, "http://127.0.0.1:9/closed", SECRET, clock=clock)
    alerts.notice(crossing())
    start, attempts = clock.now, 0
    while clock.now < start + GIVE_UP_AFTER + 400:
        attempts += len(alerts.deliver_due())
        clock.now += 61
    assert attempts >= 8                       # 2, 4, 8 ... then every ~5 minutes
    assert box.outbox_due(clock.now + 10_000, 30, 10) == []   # dropped


def test_a_worker_restart_keeps_the_outbox(store: Store, receiver: Receiver) -> None:
    clock = Clock()
    Alerts(StoreAlertBox(store, "rl:"), receiver.url, SECRET, clock=clock).notice(crossing())
    # Another process's deliverer, with nothing in memory, sends what the first left.
    fresh = Alerts(StoreAlertBox(store, "rl:"), receiver.url, SECRET, clock=clock)
    assert [d.ok for d in fresh.deliver_due()] == [True]
    assert len(receiver.got) == 1


def test_flask_alerts_test_sends_a_signed_event(tmp_path: Any, receiver: Receiver,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from app import create_app
    from tests.conftest import write_policy
    from tests.policies import plan, policy

    path = write_policy(tmp_path, policy(plans={"p": plan(5, 1, "100 per day")}))
    app = create_app({"LIMITS_CONFIG": path, "REDIS_URL": "memory://"})
    runner = app.test_cli_runner()
    assert runner.invoke(args=["alerts", "test"]).exit_code == 2   # no webhook_url
    monkeypatch.setenv("ALERT_WEBHOOK_SECRET", SECRET)
    done = runner.invoke(args=["alerts", "test", "--url", receiver.url])
    assert done.exit_code == 0, done.output
    assert "answered 200 (signed)" in done.output
    event, header, body = receiver.got[-1]
    assert event["type"] == "limit.test" and event["id"].startswith("evt_test_")
    assert verify(header, body, SECRET, now=int(event["created"]))
    receiver.statuses = [500]
    assert runner.invoke(args=["alerts", "test", "--url", receiver.url]).exit_code == 1
    closed = runner.invoke(args=["alerts", "test", "--url", "http://127.0.0.1:9/x"])
    assert closed.exit_code == 1
