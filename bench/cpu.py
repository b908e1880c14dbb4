"""python -m bench.cpu: where the echo /chat's CPU goes, per request, per process.

Throughput on a small shared machine is CPU per request: this starts the bench's Valkey and,
in turn, the no-limiter app and ours under gunicorn (4 gevent workers), drives each with wrk,
and reads /proc for the user and system CPU of the workers and of Valkey, and the workers'
context switches, divided by the requests served. It also reads how many script calls each
shared round trip carried. A profiling aid, not a benchmark table: compare rows of one run;
to see one part's share, stub it out in a scratch checkout and compare again.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import urllib.request
from pathlib import Path

from bench.contenders import Contender
from bench.loadgen import ensure_wrk, run_wrk
from bench.procs import free_port, wait_ready
from bench.store import valkey

CONTENDERS = {
    "none": Contender("none", "baseline", "bench.apps.nolimit:app", "gevent"),
    "flask-limiter": Contender("flask-limiter", "baseline", "bench.apps.flasklimiter:app",
                               "gevent"),
    "article": Contender("article", "baseline", "bench.apps.article:app", "gevent"),
    "one-evalsha": Contender("one-evalsha", "baseline", "bench.apps.one_evalsha:app", "gevent"),
    "ours": Contender("ours", "ours", worker_class="gevent"),
}
TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def _switches(pid: int) -> tuple[int, int]:
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        found[name] = value.strip()
    return int(found["voluntary_ctxt_switches"]), int(found["nonvoluntary_ctxt_switches"])


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _valkey_pid(url: str) -> int | None:
    """The bench's own server: its command line names its socket (others may be running)."""
    sock = url.split("://", 1)[1].encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"valkey-server" in cmd and sock in cmd:
                return int(entry.name)
    return None


def _sample(pids: list[int]) -> dict[int, tuple[float, float, int, int]]:
    return {pid: (*_stat(pid), *_switches(pid)) for pid in pids}


def _calls_per_trip(port: int) -> float | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    except OSError:
        return None
    values = {}
    for line in text.decode().splitlines():
        if line.startswith("llm_limiter_store_"):
            name, value = line.split()[:2]
            values[name] = float(value)
    trips = values.get("llm_limiter_store_round_trips_total")
    calls = values.get("llm_limiter_store_script_calls_total")
    return calls / trips if trips and calls else None


Sample = dict[int, tuple[float, float, int, int]]


def _per_request(before: Sample, after: Sample, pids: list[int], field: int, n: int,
                 scale: float = 1e6) -> float:
    return sum(after[q][field] - before[q][field] for q in pids) / n * scale


def _measure(name: str, url: str, wrk: str, logs: Path, duration: float,
             store_pid: int | None) -> dict[str, object]:
    port = free_port()
    proc = CONTENDERS[name].process(port, url, 4, logs)
    proc.start()
    try:
        wait_ready(proc, port, {"message": "hi", "user_id": "u1"})
        run_wrk(wrk, port, connections=64, threads=2, duration_s=1, timeout_s=5, users=1000)
        assert proc.proc is not None
        pids = _children(proc.proc.pid)
        watched = pids + ([store_pid] if store_pid else [])
        before = _sample(watched)
        result = run_wrk(wrk, port, connections=64, threads=2, duration_s=duration, timeout_s=5,
                         users=1000)
        after = _sample(watched)
        n = max(1, result.requests)
        store = [store_pid] if store_pid else []
        return {
            "contender": name,
            "req/s": round(result.ok_rps),
            "workers usr us": round(_per_request(before, after, pids, 0, n), 1),
            "workers sys us": round(_per_request(before, after, pids, 1, n), 1),
            "valkey usr+sys us": round(_per_request(before, after, store, 0, n)
                                       + _per_request(before, after, store, 1, n), 1),
            "voluntary switches": round(_per_request(before, after, pids, 2, n, 1), 2),
            "involuntary switches": round(_per_request(before, after, pids, 3, n, 1), 2),
            "calls per trip": round(trip, 1) if (trip := _calls_per_trip(port)) else None,
        }
    finally:
        proc.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="none,ours",
                   help=f"contenders, comma-separated, of {', '.join(CONTENDERS)}")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=5.0)
    args = p.parse_args(argv)
    wrk = ensure_wrk()
    logs = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    with valkey() as url:
        store_pid = _valkey_pid(url)
        for _ in range(args.rounds):
            for name in args.only.split(","):
                row = _measure(name, url, wrk, logs, args.duration, store_pid)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
