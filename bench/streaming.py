"""The streaming section's load generator and measurement: N concurrent streamed calls.

wrk cannot time a streamed body, and httpx is too slow at 1,000 connections on two cores,
so this opens N raw asyncio TCP connections at once, sends one
``POST /v1/chat/completions`` with ``"stream": true`` on each (``Connection: close``),
de-chunks the response and splits it into SSE events. Per call it records the status, the
time to connect, the time to the first ``data:`` event (TTFB of the body) and the time to
``data: [DONE]``, all from the moment the call started; or what went wrong. One deadline
bounds the whole batch, and every socket is closed before a result is returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.contenders import LIMITS, ROOT, SLOW_MODEL, Contender, base_env
from bench.procs import Managed, NotReady, free_port
from bench.store import flushall

PATH = "/v1/chat/completions"
KEY_PLAN = "bench-stream"  # bench/limits.bench.toml: the bench plan plus token/concurrency layers
KEY_USER = "bench-stream"
READ_SIZE = 65536


def message_for(words: int) -> str:
    """The prompt whose echo is a ``words``-word reply (the fake replies "echo: <prompt>")."""
    return " ".join(f"w{i}" for i in range(1, max(1, words - 1) + 1))


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class Call:
    status: int = 0  # 0: no response head
    connect_s: float | None = None
    ttfb_s: float | None = None  # first data: event
    total_s: float | None = None  # data: [DONE]
    error: str | None = None
    sample: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.total_s is not None and self.error is None


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass
class StreamResult:
    n: int
    wall_s: float
    completed: int
    statuses: dict[int, int]
    errors: dict[str, int]
    samples: dict[str, str]
    ttfb_ms: list[float] = field(repr=False)  # calls that got a first data: event
    total_ms: list[float] = field(repr=False)  # completed calls
    connect_ms: list[float] = field(repr=False)
    server_worker: str | None = None
    server_cpu_s: float | None = None  # CPU the contender's processes used during the batch

    @property
    def cpu_ms_per_call(self) -> float | None:
        if self.server_cpu_s is None or not self.n:
            return None
        return self.server_cpu_s * 1000 / self.n

    @classmethod
    def of(cls, calls: list[Call], wall_s: float) -> StreamResult:
        statuses: dict[int, int] = {}
        errors: dict[str, int] = {}
        samples: dict[str, str] = {}
        for c in calls:
            statuses[c.status] = statuses.get(c.status, 0) + 1
            if c.error:
                errors[c.error] = errors.get(c.error, 0) + 1
                samples.setdefault(c.error, c.sample)
        return cls(
            n=len(calls),
            wall_s=wall_s,
            completed=sum(c.ok for c in calls),
            statuses=statuses,
            errors=errors,
            samples=samples,
            ttfb_ms=[c.ttfb_s * 1000 for c in calls if c.ttfb_s is not None],
            total_ms=[c.total_s * 1000 for c in calls if c.ok and c.total_s is not None],
            connect_ms=[c.connect_s * 1000 for c in calls if c.connect_s is not None],
        )

    @property
    def failed(self) -> int:
        return self.n - self.completed

    def pct(self, attr: str, p: float) -> float | None:
        return percentile(getattr(self, attr), p)


@dataclass
class StreamRow:
    """One contender of the streaming section: a result per round, or why it failed."""

    name: str
    worker_class: str
    runs: list[StreamResult] = field(default_factory=list)
    round_ids: list[int] = field(default_factory=list)
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.runs)

    def add(self, result: StreamResult, round_id: int) -> None:
        self.runs.append(result)
        self.round_ids.append(round_id)

    def median(self, attr: str, p: float) -> float | None:
        values = [v for r in self.runs if (v := r.pct(attr, p)) is not None]
        return statistics.median(values) if values else None

    def median_cpu(self) -> float | None:
        values = [v for r in self.runs if (v := r.cpu_ms_per_call) is not None]
        return statistics.median(values) if values else None

    def cpu_ratios_to(self, base: StreamRow) -> list[float]:
        by_round = dict(zip(base.round_ids, base.runs, strict=True))
        out = []
        for rid, run in zip(self.round_ids, self.runs, strict=True):
            other = by_round.get(rid)
            mine, theirs = run.cpu_ms_per_call, other.cpu_ms_per_call if other else None
            if mine is not None and theirs:
                out.append(mine / theirs)
        return out

    def ratios_to(self, base: StreamRow, attr: str, p: float) -> list[float]:
        """This row's percentile over base's, for each round both ran (noise cancels)."""
        by_round = dict(zip(base.round_ids, base.runs, strict=True))
        out = []
        for rid, run in zip(self.round_ids, self.runs, strict=True):
            other = by_round.get(rid)
            mine, theirs = run.pct(attr, p), other.pct(attr, p) if other else None
            if mine is not None and theirs:
                out.append(mine / theirs)
        return out


# ---------------------------------------------------------------------------------------------
# the load generator


def request_bytes(port: int, key: str, message: str, model: str = SLOW_MODEL) -> bytes:
    body = json.dumps(
        {"model": model, "stream": True, "messages": [{"role": "user", "content": message}]}
    ).encode()
    head = (
        f"POST {PATH} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\n"
        "Accept: text/event-stream\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ValueError(f"bad status line {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]):
    """The response body as it arrives (chunked, sized or up to EOF)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            data = await reader.read(min(left, READ_SIZE))
            if not data:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(data)
            yield data
    else:
        while data := await reader.read(READ_SIZE):
            yield data


def _event_data(event: bytes) -> bytes | None:
    """The data of one SSE event (its data: lines joined), None if it has none."""
    lines = [ln[5:].removeprefix(b" ") for ln in event.split(b"\n") if ln.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


async def _call(port: int, payload: bytes, deadline: float, opened: list) -> Call:
    loop = asyncio.get_running_loop()
    call = Call()
    stage = "connect"
    writer = None
    t0 = loop.time()
    try:
        async with asyncio.timeout_at(deadline):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=READ_SIZE)
            opened.append(writer)
            call.connect_s = loop.time() - t0
            stage = "response head"
            writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
            call.status, headers = _parse_head(head)
            stage = "first event"
            if call.status != 200:
                body = b"".join([chunk async for chunk in _body(reader, headers)])
                call.error = f"HTTP {call.status}"
                call.sample = body[:300].decode(errors="replace")
                return call
            buf = b""
            async for chunk in _body(reader, headers):
                buf += chunk.replace(b"\r\n", b"\n")
                while (cut := buf.find(b"\n\n")) >= 0:
                    event, buf = buf[:cut], buf[cut + 2 :]
                    data = _event_data(event)
                    if data is None:
                        continue
                    now = loop.time()
                    if call.ttfb_s is None:
                        call.ttfb_s = now - t0
                        stage = "[DONE]"
                    if data == b"[DONE]":
                        call.total_s = now - t0
                        stage = "end of body"
                    elif b'"error"' in data and call.error is None:
                        call.error = "error event in the stream"
                        call.sample = data[:300].decode(errors="replace")
            if call.total_s is None and call.error is None:
                call.error = f"body ended before {stage}"
    except TimeoutError:
        call.error = f"timeout waiting for {stage}"
    except asyncio.IncompleteReadError:
        call.error = f"connection closed before {stage}"
    except (OSError, ValueError, asyncio.LimitOverrunError) as exc:
        call.error = f"{type(exc).__name__} before {stage}"
        call.sample = str(exc)[:300]
    finally:
        if writer is not None:
            writer.close()
    return call


async def _run(port: int, payload: bytes, n: int, timeout_s: float) -> tuple[list[Call], float]:
    loop = asyncio.get_running_loop()
    opened: list[asyncio.StreamWriter] = []
    started = loop.time()
    try:
        calls = await asyncio.gather(
            *(_call(port, payload, started + timeout_s, opened) for _ in range(n))
        )
        return list(calls), loop.time() - started
    finally:
        # Every socket closed (connection_lost run) before we return, whatever happened.
        for writer in opened:
            writer.transport.abort()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await asyncio.gather(*(w.wait_closed() for w in opened), return_exceptions=True)


def run_streams(port: int, key: str, n: int, timeout_s: float, message: str) -> StreamResult:
    """n concurrent streamed calls, all started at once; bounded by timeout_s overall."""
    calls, wall = asyncio.run(_run(port, request_bytes(port, key, message), n, timeout_s))
    return StreamResult.of(calls, wall)


# ---------------------------------------------------------------------------------------------
# one measurement: key, start, one good stream, warm up, measure, stop


def group_cpu_s(pgid: int) -> float | None:
    """User + system CPU seconds of the live processes of one process group (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    try:
        pids = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # after "pid (comm)": state ppid pgrp session tty tpgid flags minflt cminflt majflt
        # cmajflt utime stime ...
        if len(fields) > 12 and int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def create_key(redis_url: str, logdir: Path) -> str:
    """A fresh API key for the project's app (its flask CLI, same store and policy)."""
    env = base_env(redis_url, 1) | {"LIMITS_CONFIG": LIMITS}
    argv = [sys.executable, "-m", "flask", "--app", "app", "keys", "create", KEY_USER]
    argv += ["--plan", KEY_PLAN]
    try:
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        raise NotReady("`flask keys create` did not finish within 60 s") from exc
    with open(logdir / "keys-create.log", "a") as log:
        log.write(f"$ {' '.join(argv)}\n{done.stderr}exit {done.returncode}\n")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        err = (done.stderr or done.stdout).strip().splitlines()
        raise NotReady(f"`flask keys create` failed ({done.returncode}): {err[-1] if err else ''}")
    return lines[-1].strip()


def wait_stream_ready(
    managed: Managed, port: int, key: str, message: str, deadline_s: float = 30.0
) -> None:
    """Block until one streamed call completes with 200 and [DONE], or raise NotReady."""
    deadline = time.monotonic() + deadline_s
    last = "no answer"
    while time.monotonic() < deadline:
        if managed.exited() is not None:
            raise NotReady(managed.reason())
        res = run_streams(port, key, 1, min(10.0, deadline - time.monotonic() + 0.1), message)
        if res.completed == 1:
            return
        kind = next(iter(res.errors), "no [DONE]")
        last = f"{kind}: {res.samples.get(kind, '')[:300]}"
        time.sleep(0.3)
    raise NotReady(f"no complete stream within {deadline_s:.0f}s, last: {last}; {managed.reason()}")


def measure_stream(
    contender: Contender,
    redis_url: str,
    logdir: Path,
    upstream: str,
    *,
    workers: int,
    n: int,
    timeout_s: float,
    words: int,
    warm_n: int,
    settle_s: float,
) -> StreamResult:
    """Raises NotReady; the contender's processes are stopped whatever happens."""
    flushall(redis_url)
    key = create_key(redis_url, logdir) if contender.kind == "ours" else "sk-bench-none"
    port = free_port()
    message = message_for(words)
    managed = contender.process(port, redis_url, workers, logdir, upstream)
    try:
        managed.start()
        wait_stream_ready(managed, port, key, message)
        if warm_n > 0:
            run_streams(port, key, warm_n, timeout_s, message)
            time.sleep(settle_s)
        assert managed.proc is not None
        cpu_before = group_cpu_s(managed.proc.pid)  # its own session: pgid == pid
        result = run_streams(port, key, n, timeout_s, message)
        cpu_after = group_cpu_s(managed.proc.pid)
        if cpu_before is not None and cpu_after is not None:
            result.server_cpu_s = cpu_after - cpu_before
        return managed.finished(result)
    finally:
        managed.stop()


def describe(r: StreamResult, load: float) -> str:
    def ms(attr: str, p: float) -> str:
        v = r.pct(attr, p)
        return "-" if v is None else f"{v:.0f}"

    errs = ", ".join(f"{k} x{v}" for k, v in r.errors.items())
    return (
        f"{r.completed}/{r.n} completed in {r.wall_s:.1f} s, TTFB p50 {ms('ttfb_ms', 50)} ms "
        f"p99 {ms('ttfb_ms', 99)} ms, total p50 {ms('total_ms', 50)} ms p99 {ms('total_ms', 99)} "
        f"ms, connect p99 {ms('connect_ms', 99)} ms"
        + (f", server CPU {r.cpu_ms_per_call:.1f} ms/call" if r.cpu_ms_per_call else "")
        + (f"; failed {r.failed}: {errs}" if r.failed else "")
        + (f", ran {r.server_worker}" if r.server_worker else "")
        + f" (load {load:.1f})"
    )
