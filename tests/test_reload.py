"""`kill -HUP` on the gunicorn master under load: a good file is served with no failed request;
a bad one is refused, its reason logged, and the old policy keeps serving."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from limiting.reloading import KEPT
from tests.conftest import write_policy
from tests.policies import LOADED, plan, policy

ROOMY = {"p": plan(10**6, 10**6, "1000000 per day"), "tight": plan(10**6, 10**6, "2 per day")}
BEFORE = policy(store=LOADED, per_ip="1000000 per minute", plans=ROOMY)
AFTER = policy(store=LOADED, per_ip="1000000 per minute", plans=ROOMY,
               users={"probe": "tight", "probe-2": "tight"})
BAD = AFTER + "\n[plans.broken]\nburst = 'ten'\nrefill_per_second = 1\n"


def _workers(master: int) -> set[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return {int(pid) for pid in children}


def _replaced(master: int, old: set[int]) -> set[int]:
    """Eventually (bounded) the master runs four workers, none of them ``old``."""
    deadline = time.monotonic() + 60
    while True:
        now = _workers(master)
        if len(now) == 4 and not now & old:
            return now
        assert time.monotonic() < deadline, f"workers not replaced: {now} (old {old})"
        time.sleep(0.1)


class Load:
    """Threads posting /chat, each request on a connection of its own, until stopped."""

    def __init__(self, url: str, threads: int = 8) -> None:
        self.url, self.ok, self.failed = url, 0, []   # type: list[object]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, i: int) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(limits=limits, timeout=60) as client:
            while not self._stop.is_set():
                try:
                    resp = client.post(self.url + "/chat",
                                       json={"message": "hi", "user_id": f"load-{i}"})
                except httpx.HTTPError as exc:
                    self.failed.append(repr(exc))
                    continue
                if resp.status_code == 200:
                    self.ok += 1
                else:
                    self.failed.append((resp.status_code, resp.text))
                time.sleep(0.005)   # bounded: about 8 x 200 requests a second at most

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def _probe(url: str, user: str) -> list[int]:
    return [httpx.post(url + "/chat", json={"message": "hi", "user_id": user}).status_code
            for _ in range(3)]


@pytest.mark.slow
def test_hup_reloads_a_good_file_and_refuses_a_bad_one_under_load(
        gunicorn: Callable[..., object], tmp_path: Path, r: redis.Redis, unix_url: str) -> None:
    source = Path(write_policy(tmp_path, BEFORE))
    app = gunicorn(REDIS_URL=unix_url, LIMITS_CONFIG=str(source), WEB_CONCURRENCY="4",
                   LIMITER_INSTANCE=str(tmp_path / "instance"))
    master = app.proc.pid  # type: ignore[attr-defined]
    url = app.url  # type: ignore[attr-defined]
    assert _probe(url, "probe") == [200, 200, 200]   # no such limit yet
    r.flushall()
    load = Load(url)
    try:
        time.sleep(0.5)
        source.write_text(AFTER)
        old = _workers(master)
        app.proc.send_signal(signal.SIGHUP)  # type: ignore[attr-defined]
        old = _replaced(master, old)
        assert _probe(url, "probe") == [200, 200, 429]   # the new file's limit

        source.write_text(BAD)
        app.proc.send_signal(signal.SIGHUP)  # type: ignore[attr-defined]
        _replaced(master, old)
        assert _probe(url, "probe-2") == [200, 200, 429]  # the last good file still serves
        time.sleep(0.5)
    finally:
        load.stop()
    assert load.failed == [] and load.ok > 0
    log = app.log.read_text()  # type: ignore[attr-defined]
    assert "policy refused" in log and "plans.broken.burst" in log, log[-3000:]
    assert '"action": "reload_refused"' in log and '"action": "reload_accepted"' in log
    assert (tmp_path / "instance" / KEPT).read_text() == AFTER
    # The audit trail has each reload once, though four workers started on each.
    actions = [fields[b"action"] for _, fields in r.xrange("rl:audit")]
    assert actions.count(b"policy.reload_accepted") == 1, actions
    assert actions.count(b"policy.reload_refused") == 1, actions
