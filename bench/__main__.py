"""python -m bench: the limiter benchmark, every contender side by side in one run.

Fast section: the echo /chat under gunicorn (4 workers) with no limiter, Flask-Limiter, the
source article's approach and this project, interleaved over rounds (medians reported).
Slow section: a fake provider answering in 1 s, this project vs the article's FastAPI app at
256 and 1,000 connections. Then decisions/s vs PING and Redis bytes per active user.
Sequential section (in open and fast too): one client alternating between none and ours at
200 req/s, the latency ours adds to a request that meets an idle server. Open section (in fast
too): none, Flask-Limiter and ours at fixed rates, ¼ and ½ of ours' capacity (hey); the latency
ours adds below saturation.
Abuse section (in fast too): one user over its limit hammering, one IP rotating user ids
against the edge; refusals/s against the bare app's 200/s, store calls per refusal.
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
from pathlib import Path

from bench import abuse, chart, decisions, openloop, procs, report, sequential
from bench.contenders import ROOT, SLOW_MODEL
from bench.loadgen import ensure_wrk
from bench.report import Row
from bench.sections import Settings, fast_section, say, slow_section, stream_section
from bench.store import flushall, valkey
from bench.streaming import StreamRow

RESULTS = Path(__file__).resolve().parent / "results.md"
WORKER_CLASSES = ("sync", "gthread", "gevent")


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 round, 4 s per measurement, 1 s warm-up (stream: 1 round, same N)",
    )
    p.add_argument("--only", choices=("fast", "echo", "seq", "open", "abuse", "slow", "stream",
                                      "decisions"),
                   help="run only one section (fast includes echo, seq, open, abuse and "
                   "decisions; open includes seq)")
    p.add_argument("--baseline-rev", metavar="REV",
                   help="the fast section also runs ours as of commit REV (e.g. the commit "
                   "before a feature: what a request that meets none of it costs, same run)")
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
        baseline_rev=a.baseline_rev,
    )


def micro_section(s: Settings, redis_url: str) -> list[str]:
    return decisions.section(redis_url, s.ping_n, flushall)


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
    wrk = ensure_wrk() if s.only not in ("stream", "decisions") else "(not needed)"
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
                if s.only in (None, "fast", "echo"):
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
                    ]
                if s.only in (None, "fast", "decisions"):
                    out += ["## Decisions vs PING, Redis memory", "",
                            *micro_section(s, redis_url), ""]
                if s.only in (None, "fast", "open", "seq"):
                    out += [*sequential.sequential_section(
                        s.workers, s.worker_class, redis_url, logdir,
                        duration=max(15.0, s.duration), say=say), ""]
                if s.only in (None, "fast", "open"):
                    lines, _ = openloop.open_section(
                        s.workers, s.worker_class, wrk, redis_url, logdir,
                        duration=s.duration, rounds=1 if s.rounds < 3 else 2,
                        connections=s.connections, threads=s.threads, users=s.users, say=say)
                    out += [*lines, ""]
                if s.only in (None, "fast", "abuse"):
                    out += [*abuse.abuse_section(s, wrk, redis_url, logdir), ""]
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
    # Any contender that failed, even in one round, makes the run a failed one.
    failed = [f"{r.name} [{r.worker_class}]" for r in [*fast_rows, *slow_rows, *stream_rows]
              if r.failure]

    if s.only in ("decisions", "echo"):   # one section: results.md keeps the full run
        (logdir / "results.md").write_text(text)
        say(f"(written to {logdir / 'results.md'})")
        return 0

    def draw() -> None:
        chart.draw(chart.sections_of(fast_rows, slow_rows, stream_rows),
                   subtitle=f"python -m bench, revision {revision()}")
        say(f"(written to {RESULTS.relative_to(ROOT)} and {chart.PNG.relative_to(ROOT)})")

    return report.publish(text, failed, RESULTS, logdir / "results.md", draw)

if __name__ == "__main__":
    sys.exit(main())
