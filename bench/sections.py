"""The fast and slow sections of ``python -m bench``: one measurement, and the rounds of each."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import streaming
from bench.contenders import (
    ROOT,
    SLOW_MODEL,
    Contender,
    ours_at,
    ours_default_worker_class,
    ours_with_route_limits,
)
from bench.loadgen import WrkFailed, WrkResult, run_wrk
from bench.procs import Managed, NotReady, free_port, read_line, wait_ready
from bench.report import Row
from bench.store import flushall
from bench.streaming import StreamRow


@dataclass
class Settings:
    rounds: int
    duration: float
    warmup: float
    connections: int
    threads: int
    users: int
    workers: int
    worker_class: str
    worker_classes: list[str]
    slow_connections: list[int]
    slow_duration: float
    slow_delay: float
    slow_rounds: int
    only: str | None
    ping_n: int
    article_redis_pool: int
    stream_n: int
    stream_rounds: int
    stream_timeout: float
    stream_delay: float
    stream_chunk_delay: float
    stream_words: int
    baseline_rev: str | None = None   # --baseline-rev: ours as of that commit, beside ours


def say(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# one measurement: start, wait for a 200, warm up, measure, stop


def measure(
    contender: Contender,
    s: Settings,
    wrk: str,
    redis_url: str,
    logdir: Path,
    *,
    connections: int,
    duration: float,
    timeout: float,
    upstream: str | None = None,
    warm_connections: int | None = None,
    settle: float = 0.0,
) -> WrkResult:
    """Raises NotReady or WrkFailed; the contender's processes are stopped whatever happens.

    The warm-up runs at warm_connections (default: connections); then the bench waits settle
    seconds, so requests the warm-up left in flight server-side (wrk just hangs up on them)
    do not eat into the measured run.
    """
    flushall(redis_url)
    port = free_port()
    extra = {"BENCH_ARTICLE_REDIS_POOL": str(s.article_redis_pool)}
    managed: Managed = contender.process(port, redis_url, s.workers, logdir, upstream, extra)
    model = SLOW_MODEL if upstream else ""
    ready = {"message": "ready?", "user_id": "bench-ready"} | ({"model": model} if model else {})
    try:
        managed.start()
        wait_ready(managed, port, ready)
        common = dict(threads=s.threads, timeout_s=timeout, users=s.users, model=model)
        if s.warmup > 0:
            warm = warm_connections or connections
            run_wrk(wrk, port, connections=warm, duration_s=s.warmup, **common)
            time.sleep(settle)
        result = run_wrk(wrk, port, connections=connections, duration_s=duration, **common)
        return managed.finished(result)
    finally:
        managed.stop()


def describe(r: WrkResult) -> str:
    extra = f", non-2xx {r.non_2xx}" if r.non_2xx else ""
    errs = r.socket_errors + r.timeouts
    extra += f", socket errors {errs}" if errs else ""
    extra += f", ran {r.server_worker}" if r.server_worker else ""
    load = os.getloadavg()[0]
    return (
        f"{r.rps:,.0f} req/s, p50 {r.p50_ms:.1f} ms, p99 {r.p99_ms:.1f} ms{extra} (load {load:.1f})"
    )


# ---------------------------------------------------------------------------------------------
# sections


def fast_section(s: Settings, wrk: str, redis_url: str, logdir: Path) -> list[Row]:
    contenders = [
        Contender("none", "baseline", "bench.apps.nolimit:app", s.worker_class),
        Contender("flask-limiter", "baseline", "bench.apps.flasklimiter:app", s.worker_class),
        Contender("article", "baseline", "bench.apps.article:app", s.worker_class),
        Contender("one-evalsha", "baseline", "bench.apps.one_evalsha:app", s.worker_class),
        Contender("ours", "ours", worker_class=s.worker_class),
        ours_with_route_limits(s.worker_class),
    ]
    if s.baseline_rev:
        contenders.append(ours_at(s.baseline_rev, s.worker_class))
    contenders += [
        Contender(f"ours ({c})", "ours", worker_class=c)
        for c in s.worker_classes
        if c != s.worker_class
    ]
    rows = {c: Row(c.name, c.worker_class or "default") for c in contenders}
    for c in contenders:
        rows[c].failure = c.missing()
    for rnd in range(1, s.rounds + 1):
        for c in contenders:
            row = rows[c]
            if row.failure and not row.runs:
                say(f"[fast {rnd}/{s.rounds}] {c.name}: skipped ({row.failure.splitlines()[0]})")
                continue
            try:
                res = measure(
                    c,
                    s,
                    wrk,
                    redis_url,
                    logdir,
                    connections=s.connections,
                    duration=s.duration,
                    timeout=5,
                )
            except (NotReady, WrkFailed) as exc:
                row.failure = str(exc)
                say(f"[fast {rnd}/{s.rounds}] {c.name}: failed: {exc}")
                continue
            row.add(res, rnd)
            say(f"[fast {rnd}/{s.rounds}] {c.name}: {describe(res)}")
    return list(rows.values())


def _skipped(tag: str, row: Row | StreamRow, provider: Managed) -> bool:
    """A row that cannot run now: its contender never started, or the provider died."""
    if row.failure and not row.runs:
        say(f"{tag}: skipped ({row.failure.splitlines()[0]})")
        return True
    if provider.exited() is not None:
        row.failure = f"fake provider died: {provider.reason()}"
        return True
    return False


def start_provider(
    delay: float, logdir: Path, chunk_delay: float | None = None
) -> tuple[Managed, str, str]:
    """The fake LLM provider: the project's fakeprovider, or bench's stand-in if it is absent.

    chunk_delay (seconds between streamed words) needs the project's fakeprovider: the
    stand-in does not stream, so then it is not used and NotReady is raised.
    """
    sys.path.insert(0, str(ROOT))
    have = importlib.util.find_spec("fakeprovider") is not None
    if chunk_delay is not None and not have:
        raise NotReady("streaming needs the project's fakeprovider package, which is missing")
    module = "fakeprovider" if have else "bench.fake_upstream"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", module, "--port", "0", "--delay", str(delay)]
    if have:
        # Report (and enforce) limits far above the load: otherwise the fake's honest
        # x-ratelimit-remaining reaches 0 and our upstream guard rightly holds calls back.
        argv += ["--rpm", "1000000000", "--tpm", "1000000000000"]
    if chunk_delay is not None:
        argv += ["--chunk-delay", str(chunk_delay)]
    log = logdir / ("fakeprovider-stream.log" if chunk_delay is not None else "fakeprovider.log")
    managed = Managed("fakeprovider", argv, env, ROOT, log)
    managed.start(capture_stdout=True)
    try:
        line = read_line(managed, "listening on ", timeout=30)
    except BaseException:
        managed.stop()
        raise
    url = line.split("listening on ", 1)[1].strip().rstrip("/")
    if not url.startswith("http://127.0.0.1:"):
        managed.stop()
        raise NotReady(f"fake provider is not on loopback: {url}")
    return managed, url, module


def slow_section(s: Settings, wrk: str, redis_url: str, logdir: Path) -> tuple[list[Row], str]:
    default = ours_default_worker_class() if Contender("ours", "ours").missing() is None else "?"
    contenders = [Contender("ours", "ours")]
    contenders += [Contender(f"ours ({c})", "ours", worker_class=c) for c in s.worker_classes]
    contenders.append(Contender("fastapi-article", "uvicorn", "bench.apps.fastapi_article:app"))
    provider, upstream, module = start_provider(s.slow_delay, logdir)
    pool = s.article_redis_pool or "uncapped, as on redis-py 5.x"
    note = (
        f"fake provider: `python -m {module}` at {upstream}, delay {s.slow_delay:g} s; "
        f"fastapi-article's redis.asyncio pool per worker: {pool}"
    )
    if module != "fakeprovider":
        note += " (the project's fakeprovider was not importable; bench's stand-in was used)"
    say(note)
    cells: list[tuple[Row, Contender]] = []
    for conns in s.slow_connections:
        for c in contenders:
            wc = c.worker_class or (f"default ({default})" if c.kind == "ours" else "uvicorn")
            cells.append((Row(c.name, wc, connections=conns, failure=c.missing()), c))
    rows = [row for row, _ in cells]
    plan = [(rnd, row, c) for rnd in range(1, s.slow_rounds + 1) for row, c in cells]
    try:
        for rnd, row, c in plan:
            tag = f"[slow {rnd}/{s.slow_rounds} c={row.connections}] {c.name} [{row.worker_class}]"
            if _skipped(tag, row, provider):
                continue
            try:
                res = measure(
                    c, s, wrk, redis_url, logdir,
                    connections=row.connections, duration=s.slow_duration, timeout=10,
                    upstream=upstream, warm_connections=min(row.connections, 64),
                    settle=s.slow_delay + 0.5,
                )  # fmt: skip
            except (NotReady, WrkFailed) as exc:
                row.failure = str(exc)
                say(f"{tag}: failed: {exc}")
                continue
            row.add(res, rnd)
            say(f"{tag}: {describe(res)}")
    finally:
        provider.stop()
    return rows, note


def stream_section(s: Settings, redis_url: str, logdir: Path) -> tuple[list[StreamRow], str]:
    """N concurrent streamed calls: the no-limiter passthrough vs ours, interleaved rounds."""
    default = ours_default_worker_class() if Contender("ours", "ours").missing() is None else "?"
    contenders = [
        Contender("none", "baseline", "bench.apps.nolimit_stream:app", "gevent"),
        Contender("ours", "ours"),
    ]
    rows = {
        c: StreamRow(c.name, c.worker_class or f"default ({default})", failure=c.missing())
        for c in contenders
    }
    try:
        provider, upstream, module = start_provider(
            s.stream_delay, logdir, chunk_delay=s.stream_chunk_delay
        )
    except NotReady as exc:
        for row in rows.values():
            row.failure = str(exc)
        return list(rows.values()), f"fake provider not started: {exc}"
    ideal_total = s.stream_delay + (s.stream_words - 1) * s.stream_chunk_delay
    note = (
        f"fake provider: `python -m {module}` at {upstream}, {s.stream_delay:g} s before the "
        f"first chunk, {s.stream_chunk_delay:g} s between words, {s.stream_words}-word replies "
        f"(floor without any server: TTFB {s.stream_delay * 1000:.0f} ms, "
        f"total {ideal_total * 1000:.0f} ms)"
    )
    say(note)
    warm_n = min(s.stream_n, 100)
    try:
        for rnd in range(1, s.stream_rounds + 1):
            for c in contenders:
                row = rows[c]
                tag = f"[stream {rnd}/{s.stream_rounds} n={s.stream_n}] {c.name}"
                if _skipped(tag, row, provider):
                    continue
                try:
                    res = streaming.measure_stream(
                        c, redis_url, logdir, upstream,
                        workers=s.workers, n=s.stream_n, timeout_s=s.stream_timeout,
                        words=s.stream_words, warm_n=warm_n, settle_s=0.5,
                    )  # fmt: skip
                except NotReady as exc:
                    row.failure = str(exc)
                    say(f"{tag}: failed: {exc}")
                    continue
                row.add(res, rnd)
                say(f"{tag}: {streaming.describe(res, os.getloadavg()[0])}")
    finally:
        provider.stop()
    return list(rows.values()), note
