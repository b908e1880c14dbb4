"""``python -m loadtest``: arguments, the loopback-only target check, the run and its outputs."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

MAX_SECONDS = 600
MAX_REQUESTS = 100_000
MAX_RATE = 500.0
MAX_CONCURRENCY = 256


class NotLoopback(ValueError):
    """The URL is malformed, or its host is (or resolves to) something other than loopback."""


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback   # 127.0.0.0/8 and ::1


def loopback_target(url: str, path: str) -> tuple[str, str]:
    """(endpoint with the host pinned to its loopback address, Host header); else NotLoopback.

    Every address the host resolves to must be loopback; http URLs are then sent to the
    resolved address itself, so a later lookup cannot point them anywhere else.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NotLoopback(f"--url must look like http://127.0.0.1:8000, got {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise NotLoopback(f"--url has a bad port: {url!r}") from exc
    try:
        found = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise NotLoopback(f"--url host {parts.hostname!r} does not resolve: {exc}") from exc
    addresses = sorted({str(info[4][0]) for info in found})
    outside = [a for a in addresses if not _is_loopback(a)]
    if not addresses or outside:
        raise NotLoopback(f"refusing {url}: host {parts.hostname!r} resolves to "
                          f"{', '.join(outside or addresses)}, not loopback (127.0.0.0/8 or ::1);"
                          " loadtest only drives a local app")
    host_header = parts.netloc.rsplit("@", 1)[-1]
    endpoint_path = parts.path.rstrip("/") + "/" + path.lstrip("/")
    if parts.scheme == "https":
        return f"https://{host_header}{endpoint_path}", host_header
    ip = addresses[0]
    literal = f"[{ip}]" if ":" in ip else ip
    return f"http://{literal}:{port}{endpoint_path}", host_header


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Drive a local app with POST /chat for a bounded time and plot what each "
                    "rate-limit layer admitted and refused.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="loopback only")
    p.add_argument("--seconds", type=float, default=30.0, help=f"run time, at most {MAX_SECONDS}")
    p.add_argument("--rate", type=float, default=20.0, help="requests per second, all users")
    p.add_argument("--users", type=int, default=5, help="users, round-robin")
    p.add_argument("--burst", type=int, default=0, help="extra requests sent at once at start")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    p.add_argument("--max-requests", type=int, default=10_000,
                   help=f"stop after this many, at most {MAX_REQUESTS}")
    p.add_argument("--path", default="/chat")
    p.add_argument("--model", default="echo")
    p.add_argument("--user-prefix", default="loadtest-user-")
    p.add_argument("--watch-user", type=int, default=1,
                   help="which user (1..users) to plot X-RateLimit-Remaining for")
    p.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    p.add_argument("--out", type=Path, default=Path("load.png"), help="the PNG")
    p.add_argument("--csv", type=Path, default=None, help="also write per-second counts here")
    return p


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    checks = [
        (0 < args.seconds <= MAX_SECONDS, f"--seconds must be in (0, {MAX_SECONDS}]"),
        (0 < args.rate <= MAX_RATE, f"--rate must be in (0, {MAX_RATE:g}]"),
        (args.users >= 1, "--users must be at least 1"),
        (args.burst >= 0, "--burst must be 0 or more"),
        (1 <= args.concurrency <= MAX_CONCURRENCY, f"--concurrency must be 1..{MAX_CONCURRENCY}"),
        (1 <= args.max_requests <= MAX_REQUESTS, f"--max-requests must be 1..{MAX_REQUESTS}"),
        (1 <= args.watch_user <= args.users, "--watch-user must be 1..--users"),
        (0 < args.timeout <= 120, "--timeout must be in (0, 120]"),
    ]
    for ok, message in checks:
        if not ok:
            p.error(message)   # exit 2


def main(argv: list[str] | None = None) -> int:
    """0 when the run finished, 1 when nothing answered, 2 on bad arguments, 130 on Ctrl-C."""
    p = parser()
    args = p.parse_args(argv)
    _check(p, args)
    try:
        endpoint, host = loopback_target(args.url, args.path)
    except NotLoopback as exc:
        print(f"loadtest: error: {exc}", file=sys.stderr)
        return 2
    # Imported only now: a refused target never loads httpx or matplotlib.
    from loadtest.driver import LoadPlan, Recorder, run
    from loadtest.plot import write_png
    from loadtest.progress import Progress
    from loadtest.report import sent_total, summary, write_csv

    plan = LoadPlan(url=endpoint, host=host, seconds=args.seconds, rate=args.rate,
                    users=args.users, burst=args.burst, concurrency=args.concurrency,
                    max_requests=args.max_requests, model=args.model,
                    user_prefix=args.user_prefix, timeout=args.timeout, watch=args.watch_user)
    recorder = Recorder()
    progress = Progress(plan.seconds, recorder.snapshot)
    print(f"loadtest: POST {args.url.rstrip('/')}{args.path} for {plan.seconds:g}s at "
          f"{plan.rate:g}/s over {plan.users} users -> {args.out}", file=sys.stderr)
    started = time.monotonic()
    interrupted = run(plan, recorder, progress.update)
    elapsed = min(time.monotonic() - started, plan.seconds) if not interrupted else (
        time.monotonic() - started)
    progress.close(elapsed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_png(args.out, plan, args.url, recorder, elapsed)
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        write_csv(args.csv, recorder)
    print(summary(plan, recorder, elapsed, interrupted))
    print(f"plot: {args.out}" + (f"  csv: {args.csv}" if args.csv else ""))
    if interrupted:
        return 130
    answered = sum(n for label, n in recorder.totals.items()
                   if recorder.statuses.get(label, 0) != 0)
    return 0 if answered or not sent_total(recorder) else 1
