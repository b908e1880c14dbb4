"""The open-loop schedule, the sending threads and the per-second counts they record."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from loadtest.classify import SKIPPED, Outcome, classify, tightest_remaining, transport_error


@dataclass(frozen=True)
class LoadPlan:
    """What to send: everything the command line decided, the target already checked."""

    url: str                  # the endpoint, host pinned to the checked loopback address
    host: str                 # the Host header the user's URL named
    seconds: float
    rate: float               # scheduled requests per second, all users together
    users: int
    burst: int = 0            # extra requests sent at once at the start
    concurrency: int = 16
    max_requests: int = 10_000
    model: str = "echo"
    user_prefix: str = "loadtest-user-"
    timeout: float = 10.0
    watch: int = 1            # the user (1-based) whose remaining is sampled

    def user(self, n: int) -> str:
        """Request n's user: round-robin over user 1..users."""
        return f"{self.user_prefix}{n % self.users + 1}"

    @property
    def watched(self) -> str:
        return f"{self.user_prefix}{self.watch}"


@dataclass
class Recorder:
    """Counts by second since the start, guarded by one lock (sending threads record)."""

    per_second: dict[int, Counter[str]] = field(default_factory=dict)
    totals: Counter[str] = field(default_factory=Counter)
    statuses: dict[str, int] = field(default_factory=dict)     # label -> HTTP status
    remaining: list[tuple[float, int, str, bool]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, at: float, outcome: Outcome, latency: float | None = None) -> None:
        with self.lock:
            self.per_second.setdefault(int(at), Counter())[outcome.label] += 1
            self.totals[outcome.label] += 1
            self.statuses.setdefault(outcome.label, outcome.status)
            if latency is not None:
                self.latencies.append(latency)

    def sample(self, at: float, remaining: int, layer: str, refused: bool) -> None:
        with self.lock:
            self.remaining.append((at, remaining, layer, refused))

    def snapshot(self) -> Counter[str]:
        with self.lock:
            return Counter(self.totals)


def schedule(plan: LoadPlan) -> Iterator[float]:
    """Send offsets in seconds: the burst at 0, then one every 1/rate until the end or the cap."""
    count = 0
    for _ in range(plan.burst):
        if count >= plan.max_requests:
            return
        count += 1
        yield 0.0
    i = 0
    while count < plan.max_requests and (offset := i / plan.rate) < plan.seconds:
        count += 1
        i += 1
        yield offset


def run(plan: LoadPlan, recorder: Recorder, tick: Callable[[float], None]) -> bool:
    """Send the schedule; tick(elapsed) is called at least every 0.1 s. True if interrupted."""
    limits = httpx.Limits(max_connections=plan.concurrency,
                          max_keepalive_connections=plan.concurrency)
    client = httpx.Client(limits=limits, timeout=plan.timeout, trust_env=False,
                          follow_redirects=False, headers={"Host": plan.host})
    pool = ThreadPoolExecutor(plan.concurrency, thread_name_prefix="loadtest")
    slots = threading.BoundedSemaphore(plan.concurrency)
    start = time.monotonic()
    interrupted = False
    try:
        for n, offset in enumerate(schedule(plan)):
            _wait_until(start, offset, tick)
            if not slots.acquire(blocking=False):
                recorder.record(time.monotonic() - start, Outcome(SKIPPED, 0))
                continue
            with recorder.lock:
                recorder.in_flight += 1
            pool.submit(_send, client, plan, n, start, recorder, slots)
        _wait_until(start, plan.seconds, tick)
        _drain(recorder, start, plan.timeout + 1, tick)
    except KeyboardInterrupt:
        interrupted = True
        with contextlib.suppress(KeyboardInterrupt):   # a second Ctrl-C: stop waiting
            _drain(recorder, start, min(plan.timeout, 3.0), tick)
    pool.shutdown(wait=not interrupted, cancel_futures=True)
    if not interrupted:
        client.close()
    return interrupted


def _wait_until(start: float, offset: float, tick: Callable[[float], None]) -> None:
    while (left := start + offset - time.monotonic()) > 0:
        tick(time.monotonic() - start)
        time.sleep(min(left, 0.1))
    tick(time.monotonic() - start)


def _drain(recorder: Recorder, start: float, limit: float, tick: Callable[[float], None]) -> None:
    """Wait for requests in flight to come back, at most `limit` seconds."""
    deadline = time.monotonic() + limit
    while recorder.in_flight and time.monotonic() < deadline:
        tick(time.monotonic() - start)
        time.sleep(0.05)


def _send(client: httpx.Client, plan: LoadPlan, n: int, start: float, recorder: Recorder,
          slots: threading.BoundedSemaphore) -> None:
    user = plan.user(n)
    sent = time.monotonic()
    body = {"message": f"load test request {n}", "user_id": user, "model": plan.model}
    try:
        response = client.post(plan.url, json=body)
        try:
            parsed = response.json()
        except ValueError:
            parsed = None
        outcome = classify(response.status_code, parsed)
        if user == plan.watched:
            seen = tightest_remaining(response.headers, outcome)
            if seen is not None:
                recorder.sample(sent - start, seen[0], seen[1], outcome.status == 429)
    except Exception as exc:  # every failure is an outcome, never a dead thread
        outcome = transport_error(exc)
    recorder.record(sent - start, outcome, time.monotonic() - sent)
    with recorder.lock:
        recorder.in_flight -= 1
    slots.release()
