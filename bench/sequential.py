"""One sequential client: the latency the limiter adds to a request that meets an idle server.

Below saturation nothing queues, so what a client waits is the server's own path: parsing,
the middleware, the decision's round trip, the answer. The apps run at once (gunicorn, the
same workers and worker class) and one client alternates between them request by request —
none's /chat, one-evalsha's /chat (the bare app plus one EVALSHA through stock redis-py: a
limiter built the usual way), ours' /chat, ours' exempt /healthz (our stack and one PING: a
round trip that decides nothing) — at a fixed total rate, so whatever else loads the machine
falls on every target alike. Each target keeps one keep-alive connection; requests are
prebuilt bytes on a raw socket, timed from the send to the last body byte.

``python -m bench.sequential [--rate 200] [--duration 10]`` prints the table alone; the bench
(``--only open``) runs it before the open-loop section.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.contenders import Contender
from bench.procs import NotReady, free_port, stop_all, wait_ready
from bench.store import flushall, valkey

USERS = 1000


@dataclass
class Target:
    """One (app, path) the client visits in turn, with its times in ms."""

    name: str
    port: int
    path: str
    body: bool
    times: list[float] = field(default_factory=list)
    other: int = 0
    sock: socket.socket | None = None

    def request(self, user: int) -> bytes:
        if not self.body:
            return (f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n\r\n").encode()
        payload = json.dumps({"message": "hi", "user_id": f"seq-{user % USERS}"}).encode()
        head = (f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n")
        return head.encode() + payload

    def send(self, data: bytes) -> tuple[float, int]:
        """(ms from the send to the whole answer, its status); reconnects when closed."""
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = self.sock
        began = time.perf_counter()
        sock.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before the answer")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed in the body")
            rest += chunk
        elapsed = (time.perf_counter() - began) * 1000
        if b"connection: close" in head.lower():
            self.close()
        return elapsed, int(head.split(b" ", 2)[1])

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def drive(targets: list[Target], rate: float, duration: float, warmup: float) -> None:
    """Visit the targets in turn, one request per tick of 1/rate s, waiting for each answer."""
    tick = 1.0 / rate
    n_warm = int(warmup * rate)
    total = n_warm + int(duration * rate)
    due = time.perf_counter()
    for i in range(total):
        due += tick
        target = targets[i % len(targets)]
        try:
            elapsed, status = target.send(target.request(i // len(targets)))
        except (OSError, ConnectionError):
            target.close()
            target.other += 1
            continue
        if i >= n_warm:
            target.times.append(elapsed)   # timed whatever the status (a 404 is a probe too)
            if not 200 <= status < 300:
                target.other += 1
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        else:
            due = time.perf_counter()   # late: no burst to catch up (the client stays sequential)
    for target in targets:
        target.close()


def sequential_section(workers: int, worker_class: str, redis_url: str, logdir: Path, *,
                       rate: float = 200.0, duration: float = 10.0, warmup: float = 2.0,
                       extras: tuple[str, ...] = (), say: object = print) -> list[str]:
    """The section's markdown: p50/p90/p99 per target and ours minus none."""
    log = say if callable(say) else print
    none = Contender("none", "baseline", "bench.apps.nolimit:app", worker_class)
    # A limiter built the usual way: the bare app plus one EVALSHA of a token bucket through
    # stock redis-py, and nothing else.
    floor = Contender("one-evalsha", "baseline", "bench.apps.one_evalsha:app", worker_class)
    ours = Contender("ours", "ours", worker_class=worker_class)
    flushall(redis_url)
    started = []
    try:
        ports = {}
        for c in (none, floor, ours):
            port = free_port()
            managed = c.process(port, redis_url, workers, logdir)
            managed.start()
            started.append(managed)
            wait_ready(managed, port, {"message": "ready?", "user_id": "bench-ready"})
            ports[c.name] = port
        targets = [Target("none /chat", ports["none"], "/chat", True),
                   Target("one-evalsha /chat", ports["one-evalsha"], "/chat", True),
                   Target("ours /chat", ports["ours"], "/chat", True),
                   Target("ours /healthz", ports["ours"], "/healthz", False),
                   *[Target(f"{app} {path}", ports[app], path, False)
                     for app, path in (extra.split(":", 1) for extra in extras)]]
        drive(targets, rate, duration, warmup)
        for m in started:
            if m.exited() is not None:
                raise NotReady(f"{m.name} died during the run: {m.reason()}")
    except NotReady as exc:
        log(f"[sequential] failed: {exc}")
        return [f"## Sequential client: failed ({exc})"]
    finally:
        for m in started:
            m.stop()
    base = targets[0]
    out = [
        f"## One sequential client ({rate:g} req/s in turn over {len(targets)} targets, "
        f"{duration:g} s after {warmup:g} s, {workers} workers, {worker_class})",
        "",
        "| target | p50 ms | p90 ms | p99 ms | added p50 ms | added p99 ms | 2xx | other |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in targets:
        p50, p90, p99 = (percentile(t.times, p) for p in (50, 90, 99))
        if t is base:
            add = "— | —"
        else:
            add = (f"{p50 - percentile(base.times, 50):+.2f} | "
                   f"{p99 - percentile(base.times, 99):+.2f}")
        out.append(f"| {t.name} | {p50:.2f} | {p90:.2f} | {p99:.2f} | {add} "
                   f"| {len(t.times) - t.other} | {t.other} |")
        log(f"[sequential] {t.name}: p50 {p50:.2f} ms, p99 {p99:.2f} ms, other {t.other}")
    out += [
        "",
        "The apps run at once and the client alternates between the targets request by "
        "request (one keep-alive connection each, raw sockets, timed from the send to the last "
        "body byte); added: the target's percentile minus none's /chat. one-evalsha is the bare "
        "app plus one EVALSHA of a token bucket through stock redis-py; ours' /healthz is our "
        "stack and one PING, a round trip that decides nothing. Goal: ours' /chat added "
        "p50 ≤ 0.3 ms, p99 ≤ 1 ms.",
    ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--worker-class", default="gevent")
    parser.add_argument("--get", action="append", default=[],
                        help="another target, app:path (GET), e.g. ours:/nothing")
    opts = parser.parse_args()
    logdir = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    try:
        with valkey() as url:
            lines = sequential_section(opts.workers, opts.worker_class, url, logdir,
                                       rate=opts.rate, duration=opts.duration,
                                       warmup=opts.warmup, extras=tuple(opts.get))
    finally:
        stop_all()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
