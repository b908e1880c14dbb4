"""Alerts under gunicorn with four workers on a real Valkey: many clients racing through a
quota's thresholds make exactly one event per threshold, the local webhook receives each one
signed, and the counter adds up to the same across workers."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from limiting.core.alerting import verify
from tests import topologies
from tests.policies import LOADED, plan, policy, write_policy
from tests.webhooks import Receiver

pytestmark = pytest.mark.slow
cluster = topologies.cluster
cluster_url = topologies.cluster_url

SECRET = "whsec_gunicorn"


@pytest.mark.parametrize("store", ["redis_url", "cluster_url"])
def test_racing_clients_make_one_signed_event_per_threshold(
        gunicorn, tmp_path: Path, store: str, request: pytest.FixtureRequest) -> None:
    """On one Valkey, and on a 3-master Cluster (the claim and the outbox in slots of their
    own, apart from the user's)."""
    redis_url = request.getfixturevalue(store)
    if store == "redis_url":
        redis.Redis.from_url(redis_url).flushall()
    user = f"racer-{store}"
    receiver = Receiver()
    try:
        text = policy(store=LOADED, per_ip="100000 per 10 seconds", default="p",
                      plans={"p": plan(1000, 100, "20 per day", alert_at=[0.5, 1.0])})
        text += f'\n[alerts]\nwebhook_url = "{receiver.url}"\n'
        server = gunicorn(REDIS_URL=redis_url, LIMITS_CONFIG=write_policy(tmp_path, text),
                          WEB_CONCURRENCY="4", ALERT_WEBHOOK_SECRET=SECRET, METRICS_TOKEN="m")

        def chat(_: int) -> int:
            return httpx.post(server.url + "/chat", timeout=30, json={
                "message": "hi", "user_id": user}).status_code

        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(chat, range(40)))
        assert codes.count(200) == 20 and codes.count(429) == 20
        deadline = time.monotonic() + 60     # each worker's deliverer sends within seconds
        while len(receiver.got) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)                        # and nothing more comes
        events = [event for event, _, _ in receiver.got]
        assert sorted(e["threshold"] for e in events) == [0.5, 1.0], events
        assert len({e["id"] for e in events}) == 2
        for event, header, body in receiver.got:
            assert verify(header, body, SECRET, now=int(time.time()))
            assert (event["subject"], event["realm"], event["layer"]) == \
                (user, "anonymous", "quota-day")
            assert event["limit"] == 20 and event["used"] >= event["threshold"] * 20
        metrics = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer m"},
                            timeout=30).text
        made = sum(float(v) for v in re.findall(
            r'^llm_limiter_alerts_total\{[^}]*\} ([0-9.e+]+)$', metrics, re.M))
        assert made == 2
    finally:
        receiver.close()
