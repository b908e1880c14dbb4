"""wrk: making sure it is installed, running it with bench/wrk/chat.lua, reading its result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "wrk" / "chat.lua"


def ensure_wrk() -> str:
    """Path to wrk, installing Debian's package with apt-get if it is missing."""
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk not found: installing the Debian package (apt-get install wrk) ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    apt = ["apt-get"] if os.geteuid() == 0 else ["sudo", "-n", "apt-get"]
    install = subprocess.run(
        [*apt, "install", "-y", "-qq", "wrk"], env=env, capture_output=True, timeout=600
    )
    if install.returncode != 0:
        subprocess.run([*apt, "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(
            [*apt, "install", "-y", "-qq", "wrk"], env=env, capture_output=True, timeout=600
        )
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is required and `apt-get install wrk` did not provide it")
    return found


@dataclass
class WrkResult:
    rps: float
    requests: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    statuses: dict[int, int] = field(default_factory=dict)
    samples: dict[int, str] = field(default_factory=dict)  # status -> a body seen (non-2xx)
    server_worker: str | None = None  # worker class the server said it used (gunicorn)
    connect_errors: int = 0
    read_errors: int = 0
    write_errors: int = 0
    timeouts: int = 0

    @property
    def non_2xx(self) -> int:
        return sum(n for code, n in self.statuses.items() if not 200 <= code < 300)

    @property
    def ok_rps(self) -> float:
        """2xx responses per second: refusals and errors are cheap and must not count."""
        ok = sum(n for code, n in self.statuses.items() if 200 <= code < 300)
        return ok / self.duration_s if self.duration_s else 0.0

    @property
    def count_429(self) -> int:
        return self.statuses.get(429, 0)

    @property
    def socket_errors(self) -> int:
        return self.connect_errors + self.read_errors + self.write_errors


class WrkFailed(Exception):
    pass


def run_wrk(
    wrk: str,
    port: int,
    *,
    connections: int,
    threads: int,
    duration_s: float,
    timeout_s: float,
    users: int,
    model: str = "",
    key: str = "",
) -> WrkResult:
    threads = max(1, min(threads, connections))
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        f"--timeout={max(1, round(timeout_s))}s",
        "-s",
        str(SCRIPT),
        f"http://127.0.0.1:{port}/chat",
    ]
    env = dict(os.environ, BENCH_USERS=str(users), BENCH_THREADS=str(threads), BENCH_MODEL=model,
               BENCH_KEY=key)
    try:
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=duration_s + timeout_s + 30
        )
    except subprocess.TimeoutExpired as exc:
        raise WrkFailed(f"wrk did not finish in time: {' '.join(argv)}") from exc
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return _parse(json.loads(line[len("BENCH_JSON ") :]))
    raise WrkFailed(
        f"wrk exited {done.returncode} without a result: {(done.stderr or done.stdout)[-500:]}"
    )


def _parse(data: dict) -> WrkResult:
    duration_s = data["duration_us"] / 1e6
    lat = data["latency_us"]
    errs = data["errors"]
    return WrkResult(
        rps=data["requests"] / duration_s if duration_s else 0.0,
        requests=data["requests"],
        duration_s=duration_s,
        p50_ms=lat["p50"] / 1000,
        p90_ms=lat["p90"] / 1000,
        p99_ms=lat["p99"] / 1000,
        statuses={int(code): n for code, n in data["statuses"].items()},
        samples={int(code): body for code, body in data.get("samples", {}).items()},
        connect_errors=errs["connect"],
        read_errors=errs["read"],
        write_errors=errs["write"],
        timeouts=errs["timeout"],
    )
