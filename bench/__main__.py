"""python -m bench: the limiter benchmark, every contender side by side in one run.

Fast section: the echo /chat under gunicorn (4 workers) with no limiter, Flask-Limiter, the
source article's approach and this project, interleaved over rounds (medians reported).
Slow section: a fake provider answering in 1 s, this project vs the article's FastAPI app at
256 and 1,000 connections. Then decisions/s vs PING and Redis bytes per active user.
Stream section: 1,000 concurrent streamed /v1/chat/completions calls, this project vs the same
passthrough without a limiter; the limiter's added time-to-first-byte as a ratio.
Everything talks to one Valkey started here, over a unix socket; HTTP only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import decisions, procs, report, streaming
from bench.contenders import ROOT, SLOW_MODEL, Contender, ours_default_worker_class
from bench.loadgen import WrkFailed, WrkResult, ensure_wrk, run_wrk
from bench.procs import Managed, NotReady, free_port, read_line, wait_ready
from bench.report import Row
from bench.store import flushall, valkey
from bench.streaming import StreamRow

RESULTS = Path(__file__).resolve().parent / "results.md"
WORKER_CLASSES = ("sync", "gthread", "gevent")


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


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 round, 4 s per measurement, 1 s warm-up (stream: 1 round, same N)",
    )
    p.add_argument("--only", choices=("fast", "slow", "stream"), help="run only one section")
    p.add_argument(
        "--rounds", type=int, help="interleaved rounds in the fast section (default 3, quick 1)"
    )
    p.add_argument(
        "--duration", type=float, help="seconds per fast measurement (default 8, quick 4)"
    )
    p.add_argument(
        "--warmup", type=float, help="warm-up seconds before each measurement (default 2, quick 1)"
    )
    p.add_argument(
        "--connections",
        type=int,
        default=64,
        help="wrk connections in the fast section (default 64)",
    )
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument(
        "--users", type=int, default=1000, help="distinct user_ids, round-robin (default 1000)"
    )
    p.add_argument("--workers", type=int, default=4, help="gunicorn/uvicorn workers (default 4)")
    p.add_argument(
        "--worker-class",
        default="gevent",
        choices=WORKER_CLASSES,
        help="worker class of the fast section, baselines and ours alike (default gevent)",
    )
    p.add_argument(
        "--worker-classes",
        default="",
        help="comma list of extra worker classes to run ours under (e.g. gevent,gthread,sync): "
        "extra ours rows in both sections, next to ours' default in the slow one",
    )
    p.add_argument(
        "--slow-connections",
        default="256,1000",
        help="comma list of wrk connections for the slow section",
    )
    p.add_argument(
        "--slow-duration", type=float, help="seconds per slow measurement (default 10, quick 4)"
    )
    p.add_argument("--slow-rounds", type=int, help="interleaved rounds, slow section (default 2)")
    p.add_argument(
        "--delay", type=float, default=1.0, help="fake provider delay in seconds (default 1.0)"
    )
    p.add_argument(
        "--article-redis-pool",
        type=int,
        default=0,
        help="cap of the FastAPI article app's redis.asyncio pool per worker; 0 (default) = "
        "uncapped as on redis-py 5.x, which the article was tested with; 100 = redis-py >= 6's "
        "default cap",
    )
    p.add_argument(
        "--stream-n", type=int, default=1000, help="concurrent streamed calls (default 1000)"
    )
    p.add_argument(
        "--stream-rounds", type=int, help="interleaved rounds, stream section (default 2, quick 1)"
    )
    p.add_argument(
        "--stream-timeout",
        type=float,
        default=60.0,
        help="deadline of one batch of streamed calls, seconds (default 60)",
    )
    p.add_argument(
        "--stream-delay",
        type=float,
        default=0.2,
        help="fake provider delay before a stream's first chunk, seconds (default 0.2)",
    )
    p.add_argument(
        "--chunk-delay",
        type=float,
        default=0.05,
        help="fake provider delay between streamed words, seconds (default 0.05)",
    )
    p.add_argument(
        "--stream-words", type=int, default=10, help="words in each streamed reply (default 10)"
    )
    a = p.parse_args(argv)
    classes = [c.strip() for c in a.worker_classes.split(",") if c.strip()]
    bad = [c for c in classes if c not in WORKER_CLASSES]
    if bad:
        p.error(f"--worker-classes: unknown {bad}; choose from {', '.join(WORKER_CLASSES)}")
    return Settings(
        rounds=a.rounds or (1 if a.quick else 3),
        duration=a.duration or (4.0 if a.quick else 8.0),
        warmup=a.warmup if a.warmup is not None else (1.0 if a.quick else 2.0),
        connections=a.connections,
        threads=a.threads,
        users=a.users,
        workers=a.workers,
        worker_class=a.worker_class,
        worker_classes=classes,
        slow_connections=[int(c) for c in a.slow_connections.split(",") if c.strip()],
        slow_duration=a.slow_duration or (4.0 if a.quick else 10.0),
        slow_delay=a.delay,
        slow_rounds=a.slow_rounds or (1 if a.quick else 2),
        only=a.only,
        ping_n=5000 if a.quick else 20000,
        article_redis_pool=a.article_redis_pool,
        stream_n=a.stream_n,
        stream_rounds=a.stream_rounds or (1 if a.quick else 2),
        stream_timeout=a.stream_timeout,
        stream_delay=a.stream_delay,
        stream_chunk_delay=a.chunk_delay,
        stream_words=max(2, a.stream_words),
    )


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
        if managed.exited() is not None:
            raise NotReady(f"died during the run: {managed.reason()}")
        result.server_worker = managed.gunicorn_worker()
        return result
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
    ]
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
            if row.failure and not row.runs:
                say(f"{tag}: skipped ({row.failure.splitlines()[0]})")
                continue
            if provider.exited() is not None:
                row.failure = f"fake provider died: {provider.reason()}"
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
                if row.failure and not row.runs:
                    say(f"{tag}: skipped ({row.failure.splitlines()[0]})")
                    continue
                if provider.exited() is not None:
                    row.failure = f"fake provider died: {provider.reason()}"
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


def micro_section(s: Settings, redis_url: str) -> list[str]:
    lines = []
    flushall(redis_url)
    ping_s = decisions.ping_loop(redis_url, s.ping_n)
    ping_rate = s.ping_n / ping_s
    try:
        flushall(redis_url)
        dec_s = decisions.decisions_loop(redis_url, s.ping_n)
        rate = s.ping_n / dec_s
        lines.append(
            f"- decisions/s vs PING: {rate:,.0f} decisions/s vs {ping_rate:,.0f} PING/s "
            f"= {rate / ping_rate:.2f}x PING (n={s.ping_n}, sequential, one client)"
        )
    except NotImplementedError as exc:
        lines.append(
            f"- decisions/s vs PING: PING {ping_rate:,.0f}/s (n={s.ping_n}); "
            f"decisions: not available ({exc})"
        )
    try:
        flushall(redis_url)
        per_user = decisions.bytes_per_user(redis_url)
        lines.append(f"- Redis bytes per active user: {per_user:,.0f}")
    except NotImplementedError as exc:
        lines.append(f"- Redis bytes per active user: not available ({exc})")
    return lines


# ---------------------------------------------------------------------------------------------


def versions() -> str:
    names = [
        "flask",
        "flask-limiter",
        "limits",
        "redis",
        "gunicorn",
        "gevent",
        "fastapi",
        "uvicorn",
        "openai",
    ]
    out = []
    for n in names:
        try:
            out.append(f"{n} {importlib.metadata.version(n)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{n} (missing)")
    return ", ".join(out)


def revision() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return done.stdout.strip() or "no commit yet"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _on_term(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_term)
    raise_fd_limit()
    wrk = ensure_wrk() if s.only != "stream" else "(not needed)"
    started = time.monotonic()
    out: list[str] = [
        "# Benchmark results",
        "",
        f"`python -m bench{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` — "
        f"{dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, revision {revision()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}.",
        "",
        f"Versions: {versions()}.",
        "",
        "This machine is small and shared: read the ratios, not the absolute numbers.",
        "",
    ]
    fast_rows: list[Row] = []
    slow_rows: list[Row] = []
    stream_rows: list[StreamRow] = []
    logdir = Path(tempfile.mkdtemp(prefix="bench-logs-"))  # kept: failures point into it
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        try:
            with valkey(Path(tmp)) as redis_url:
                say(f"valkey: {redis_url}; wrk: {wrk}; logs: {logdir}")
                if s.only in (None, "fast"):
                    fast_rows = fast_section(s, wrk, redis_url, logdir)
                    out += [
                        f"## Echo /chat, no upstream ({s.workers} workers, "
                        f"wrk -t{s.threads} -c{s.connections}, {s.duration:g} s after "
                        f"{s.warmup:g} s warm-up, {s.rounds} interleaved round(s), "
                        f"{s.users} user_ids round-robin)",
                        "",
                        *report.fast_table(fast_rows),
                        "",
                        "vs none: median over rounds of 2xx/s / none's 2xx/s in the same round. "
                        "p50/p99: medians over rounds. non-2xx, 429, socket errors (incl. "
                        "timeouts): totals over rounds.",
                        "",
                        *report.flags(fast_rows),
                        "",
                        "## Decisions vs PING, Redis memory",
                        "",
                        *micro_section(s, redis_url),
                        "",
                    ]
                if s.only in (None, "slow"):
                    slow_rows, note = slow_section(s, wrk, redis_url, logdir)
                    out += [
                        f"## Slow upstream ({s.workers} workers, wrk -t{s.threads}, "
                        f"{s.slow_duration:g} s after {s.warmup:g} s warm-up, --timeout 10s, "
                        f"{s.slow_rounds} interleaved round(s), model {SLOW_MODEL})",
                        "",
                        note + ".",
                        "",
                        *report.slow_table(slow_rows, reference="fastapi-article"),
                        "",
                        "req/s counts every response, 2xx/s only successes; ours / fastapi: "
                        "median over rounds of the same-round ratio of 2xx/s. req/s, p50/p99: "
                        "medians over rounds; error counts: totals.",
                        "",
                        *report.flags(slow_rows),
                        "",
                    ]
                if s.only in (None, "stream"):
                    stream_rows, note = stream_section(s, redis_url, logdir)
                    out += [
                        f"## Streaming ({s.stream_n:,} concurrent streamed calls to "
                        f"/v1/chat/completions, {s.workers} workers, gevent, "
                        f"{s.stream_rounds} interleaved round(s), model {SLOW_MODEL})",
                        "",
                        note + ".",
                        "",
                        *report.stream_table(stream_rows),
                        "",
                        report.stream_added_ttfb(stream_rows),
                        "",
                        "TTFB: from the start of a call (before connect) to its first `data:` "
                        "event; total: to `data: [DONE]`. Percentiles over one batch's calls "
                        "(TTFB over calls that got an event, total over completed ones), then "
                        "medians over rounds; completed/failed: medians over rounds. "
                        f"Each batch starts all calls at once after a {min(s.stream_n, 100)}-call "
                        f"warm-up, {s.stream_timeout:g} s deadline. Server CPU ms/call: user + "
                        "system CPU of the contender's processes during the batch / calls.",
                        "",
                        *report.stream_flags(stream_rows),
                        "",
                    ]
        except KeyboardInterrupt:
            say("interrupted: stopping everything the bench started")
            return 130
        finally:
            procs.stop_all()
        failures: list[Row | StreamRow] = [
            r for r in [*fast_rows, *slow_rows, *stream_rows] if r.failure and not r.ok
        ]
        if failures:
            out += ["## Failures", ""]
            for r in failures:
                where = f" (c={r.connections})" if getattr(r, "connections", 0) else ""
                out += [
                    f"- {r.name} [{r.worker_class}]{where}:",
                    "",
                    "```",
                    (r.failure or "").strip(),
                    "```",
                    "",
                ]
    out.append(f"Total bench time {time.monotonic() - started:.0f} s.")
    text = "\n".join(out).rstrip() + "\n"
    say("")
    say(text)
    RESULTS.write_text(text)
    say(f"(written to {RESULTS.relative_to(ROOT)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
