"""python -m loadtest against the app under gunicorn: counts, CSV, PNG, and loopback only."""

from __future__ import annotations

import csv
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from loadtest.classify import Outcome, classify, tightest_remaining
from loadtest.cli import NotLoopback, loopback_target
from loadtest.driver import LoadPlan, schedule
from tests.conftest import ROOT, write_policy
from tests.policies import LOADED, plan, policy

BURST, REFILL, SECONDS, USERS, RATE = 5, 1, 6, 2, 10
POLICY = policy(store=LOADED, per_ip="100000 per minute",
                plans={"load": plan(BURST, REFILL, "20 per minute")})


def loadtest(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loadtest", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_load_run_writes_png_and_csv_within_the_policy(gunicorn, tmp_path: Path, r: redis.Redis,
                                                       unix_url: str) -> None:
    # Two workers: still several processes sharing one store, and a quicker start and stop.
    app = gunicorn(REDIS_URL=unix_url, LIMITS_CONFIG=write_policy(tmp_path, POLICY),
                   WEB_CONCURRENCY="2")
    png, table = tmp_path / "load.png", tmp_path / "load.csv"
    done = loadtest("--url", app.url, "--seconds", str(SECONDS), "--rate", str(RATE),
                    "--users", str(USERS), "--out", str(png), "--csv", str(table))
    assert done.returncode == 0, done.stderr
    assert "achieved rate" in done.stdout and "admitted" in done.stdout
    assert "\r" not in done.stderr and "loadtest" in done.stderr   # not a TTY: plain lines

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    rows = list(csv.DictReader(table.open()))
    assert rows and rows[0].keys() >= {"second", "sent", "admitted"}
    totals = {key: sum(int(row[key]) for row in rows) for key in rows[0] if key != "second"}
    refused = {k: n for k, n in totals.items()
               if k not in ("second", "sent", "admitted", "skipped") and n}
    assert totals["admitted"] > 0 and refused, totals
    assert set(refused) <= {"user", "quota-minute"}, totals
    assert totals["sent"] == totals["admitted"] + sum(refused.values())
    assert totals["sent"] >= RATE * SECONDS * 0.8
    assert totals["admitted"] <= USERS * (BURST + REFILL * SECONDS + 2), totals


def test_non_loopback_url_is_refused_before_sending(tmp_path: Path) -> None:
    # A listener on every interface, reached by this machine's own non-loopback address if it
    # has one: the refusal must come before any connection.
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        host = _outside_address() or "192.0.2.1"
        done = loadtest("--url", f"http://{host}:{port}", "--seconds", "2",
                        "--out", str(tmp_path / "x.png"), timeout=20)
        with pytest.raises(TimeoutError):
            listener.accept()
    assert done.returncode == 2
    assert "not loopback" in done.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("url", ["http://10.1.2.3:80", "http://0.0.0.0:8000",
                                 "http://[::ffff:10.0.0.1]:80", "ftp://127.0.0.1/",
                                 "http://nonexistent.invalid:80"])
def test_loopback_target_refuses(url: str) -> None:
    with pytest.raises(NotLoopback):
        loopback_target(url, "/chat")


def test_loopback_target_pins_the_address() -> None:
    assert loopback_target("http://127.0.0.2:8000", "/chat") == (
        "http://127.0.0.2:8000/chat", "127.0.0.2:8000")
    assert loopback_target("http://[::1]:9/", "chat")[0] == "http://[::1]:9/chat"
    endpoint, host = loopback_target("http://localhost:8000", "/chat")
    assert host == "localhost:8000" and endpoint.endswith(":8000/chat")


def test_classify_and_remaining() -> None:
    assert classify(200, {"reply": "x"}).label == "admitted"
    assert classify(429, {"layer": "quota-day"}) == Outcome("quota-day", 429)
    assert classify(503, {"code": "limiter_unavailable"}).label == "limiter_unavailable"
    assert classify(502, {"code": "upstream_error"}).label == "error:502"
    assert classify(429, None).label == "error:429"
    headers = {"x-ratelimit-remaining": "3", "ratelimit": '"user";r=3;t=2, "quota-minute";r=9;t=60'}
    assert tightest_remaining(headers, Outcome("admitted", 200)) == (3, "user")
    assert tightest_remaining({}, Outcome("admitted", 200)) is None


def test_schedule_is_bounded() -> None:
    plan = LoadPlan(url="", host="", seconds=2, rate=10, users=3, burst=4, max_requests=15)
    offsets = list(schedule(plan))
    assert offsets[:4] == [0.0] * 4 and len(offsets) == 15 and max(offsets) < 2
    assert len(list(schedule(LoadPlan(url="", host="", seconds=2, rate=10, users=1)))) == 20
    assert [plan.user(n) for n in range(4)] == ["loadtest-user-1", "loadtest-user-2",
                                                 "loadtest-user-3", "loadtest-user-1"]


def _outside_address() -> str | None:
    """This machine's address on its default route, if it has one that is not loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))   # UDP: picks a route, sends nothing
            address = str(s.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address
