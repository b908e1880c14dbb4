"""Open loop: what a user feels below saturation, at fixed rates of ¼ and ½ of ours' capacity.

Closed-loop p99 at saturation is a queueing figure. Here ours' own capacity is measured first
(wrk, closed loop, same round): a rate set from the bare app's, which serves more, would load
ours far closer to saturation than the bare app and measure ours' queueing, not its overhead.
Then every contender gets the same fixed request rate, a quarter and a half of it, from hey
(`-q`, per worker, times `-c` workers). Each hey worker waits for its answer before its next
tick, so a stall delays later sends (coordinated omission); with many workers each ticking
every tens of milliseconds and answers in a few, the effect is below the 0.1 ms that hey
reports. Added latency: ours' percentile minus none's, same round and rate.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.contenders import Contender
from bench.loadgen import run_wrk
from bench.procs import NotReady, free_port, wait_ready
from bench.store import flushall

HEY_WORKERS = 32
FRACTIONS = (0.25, 0.5)   # of ours' measured capacity
_PCT = re.compile(r"^\s*(\d+)% in ([\d.]+) secs", re.M)
_STATUS = re.compile(r"^\s*\[(\d+)\]\s+(\d+) responses", re.M)


def ensure_hey() -> str | None:
    """Path to hey, installing Debian's package if we may; None when it cannot be had."""
    found = shutil.which("hey")
    if found:
        return found
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    apt = ["apt-get"] if os.geteuid() == 0 else ["sudo", "-n", "apt-get"]
    subprocess.run([*apt, "install", "-y", "-qq", "hey"], env=env, capture_output=True,
                   timeout=600, check=False)
    return shutil.which("hey")


@dataclass
class OpenResult:
    rate: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    ok: int
    other: int


@dataclass
class OpenRow:
    """One contender at one fraction of ours' capacity, over rounds."""

    name: str
    fraction: float
    runs: list[OpenResult] = field(default_factory=list)
    failure: str | None = None


def run_hey(hey: str, port: int, rate: float, duration_s: float) -> OpenResult:
    body = json.dumps({"message": "hi", "user_id": "open-loop"})
    argv = [hey, "-z", f"{max(1, round(duration_s))}s", "-c", str(HEY_WORKERS),
            "-q", f"{rate / HEY_WORKERS:.3f}", "-t", "5", "-m", "POST",
            "-T", "application/json", "-d", body, f"http://127.0.0.1:{port}/chat"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30)
    pct = {int(p): float(s) * 1000 for p, s in _PCT.findall(done.stdout)}
    statuses = {int(c): int(n) for c, n in _STATUS.findall(done.stdout)}
    if not pct or 50 not in pct or 99 not in pct:
        raise NotReady(f"hey gave no latency distribution: {(done.stderr or done.stdout)[-300:]}")
    ok = sum(n for c, n in statuses.items() if 200 <= c < 300)
    return OpenResult(rate, pct[50], pct.get(90, pct[99]), pct[99], ok,
                      sum(statuses.values()) - ok)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def open_section(workers: int, worker_class: str, wrk: str, redis_url: str, logdir: Path, *,
                 duration: float, rounds: int, connections: int, threads: int, users: int,
                 say: object = print) -> tuple[list[str], list[OpenRow]]:
    """The section's markdown lines and rows: none, Flask-Limiter and ours at fixed rates,
    FRACTIONS of ours' capacity measured in the same round."""
    log = say if callable(say) else print
    hey = ensure_hey()
    contenders = [
        Contender("none", "baseline", "bench.apps.nolimit:app", worker_class),
        Contender("flask-limiter", "baseline", "bench.apps.flasklimiter:app", worker_class),
        Contender("ours", "ours", worker_class=worker_class),
    ]
    rows = {(c.name, f): OpenRow(c.name, f) for f in FRACTIONS for c in contenders}
    if hey is None:
        return ["hey is not installed (`apt-get install hey`): open-loop section skipped."], []
    capacities: list[float] = []
    for rnd in range(1, rounds + 1):
        capacity = _capacity(contenders[2], workers, wrk, redis_url, logdir, duration,
                             connections, threads, users)
        capacities.append(capacity)
        log(f"[open {rnd}/{rounds}] ours' capacity {capacity:,.0f} req/s")
        for fraction in FRACTIONS:
            rate = max(50.0, capacity * fraction)
            for c in contenders:
                row = rows[(c.name, fraction)]
                try:
                    res = _one(c, hey, workers, redis_url, logdir, rate, duration)
                except NotReady as exc:
                    row.failure = str(exc)
                    log(f"[open {rnd}/{rounds}] {c.name} at {fraction:g}: failed: {exc}")
                    continue
                row.runs.append(res)
                log(f"[open {rnd}/{rounds}] {c.name} at {rate:,.0f} req/s: p50 "
                    f"{res.p50_ms:.1f} ms, p99 {res.p99_ms:.1f} ms, 2xx {res.ok}, "
                    f"other {res.other}")
    lines = _report(list(rows.values()), capacities, workers, duration, rounds)
    return lines, list(rows.values())


def _capacity(ours: Contender, workers: int, wrk: str, redis_url: str, logdir: Path,
              duration: float, connections: int, threads: int, users: int) -> float:
    """Ours' closed-loop 2xx/s (wrk), on a fresh store, after a second's warm-up."""
    flushall(redis_url)
    port = free_port()
    managed = ours.process(port, redis_url, workers, logdir)
    try:
        managed.start()
        wait_ready(managed, port, {"message": "ready?", "user_id": "bench-ready"})
        common = dict(threads=threads, timeout_s=5, users=users)
        run_wrk(wrk, port, connections=connections, duration_s=1, **common)
        return run_wrk(wrk, port, connections=connections, duration_s=duration, **common).ok_rps
    finally:
        managed.stop()


def _one(c: Contender, hey: str, workers: int, redis_url: str, logdir: Path, rate: float,
         duration: float) -> OpenResult:
    flushall(redis_url)
    port = free_port()
    managed = c.process(port, redis_url, workers, logdir)
    try:
        managed.start()
        wait_ready(managed, port, {"message": "ready?", "user_id": "bench-ready"})
        run_hey(hey, port, rate, 1)          # warm-up: connections, caches, scripts loaded
        time.sleep(0.2)
        result = run_hey(hey, port, rate, duration)
        if managed.exited() is not None:
            raise NotReady(f"died during the run: {managed.reason()}")
        return result
    finally:
        managed.stop()


def _report(rows: list[OpenRow], capacities: list[float], workers: int, duration: float,
            rounds: int) -> list[str]:
    capacity = _median(capacities) if capacities else 0.0
    out = [
        f"## Open loop: echo /chat at fixed rates, ¼ and ½ of ours' capacity "
        f"({capacity:,.0f} req/s; {workers} workers, hey -c{HEY_WORKERS} -q, {duration:g} s, "
        f"{rounds} round(s))",
        "",
        "| rate | contender | p50 ms | p90 ms | p99 ms | added p50 ms | added p99 ms | 2xx "
        "| other |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for fraction in FRACTIONS:
        here = [r for r in rows if r.fraction == fraction]
        none = next((r for r in here if r.name == "none" and r.runs), None)
        rate = _median([r.rate for r in none.runs]) if none is not None else 0.0
        label = f"{fraction:g} ({rate:,.0f}/s)"
        for row in here:
            out.append(f"| {label} | {_cells(row, none)} |")
    out += [
        "",
        "Rate: ours' closed-loop 2xx/s (wrk, same round) times ¼ and ½, sent by hey's workers "
        "at a fixed tick. Latency from send to answer (hey reports 0.1 ms steps); added: the "
        "contender's percentile minus none's at the same rate in the same round, median over "
        "rounds.",
    ]
    return out


def _cells(row: OpenRow, none: OpenRow | None) -> str:
    if not row.runs:
        return f"{row.name} | failed | | | | | |"
    p50 = _median([r.p50_ms for r in row.runs])
    p90 = _median([r.p90_ms for r in row.runs])
    p99 = _median([r.p99_ms for r in row.runs])
    if none is not None and row is not none:
        pairs = list(zip(row.runs, none.runs, strict=False))
        add50 = f"{_median([a.p50_ms - b.p50_ms for a, b in pairs]):+.1f}"
        add99 = f"{_median([a.p99_ms - b.p99_ms for a, b in pairs]):+.1f}"
    else:
        add50 = add99 = "—"
    ok = sum(r.ok for r in row.runs)
    other = sum(r.other for r in row.runs)
    return (f"{row.name} | {p50:.1f} | {p90:.1f} | {p99:.1f} | {add50} | {add99} "
            f"| {ok} | {other}")
