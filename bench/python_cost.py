"""python -m bench.python_cost: the limiter's Python per request, in one process.

The echo /chat of the bare app and of ours, called as WSGI apps with prebuilt environs (no
server, no sockets), CPU time per request, best of 5 passes. ``--stub`` answers ours' store
calls with one recorded reply, so what remains over the bare app is the limiter's own Python
(identity, policy, decision, headers, metrics, hooks); without it the real Valkey round trip
is included. A profiling aid beside ``python -m bench.cpu`` (which measures in situ under wrk):
compare rows of one run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

from bench.store import valkey

BENCH_POLICY = os.path.join(os.path.dirname(__file__), "limits.bench.toml")


def _environ(body: bytes) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "POST", "PATH_INFO": "/chat", "SCRIPT_NAME": "", "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1",
        "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)),
        "REMOTE_ADDR": "127.0.0.1", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr, "wsgi.multithread": False, "wsgi.multiprocess": True,
        "wsgi.run_once": False, "wsgi.input_terminated": True, "HTTP_HOST": "127.0.0.1:8000",
    }


def cpu_per_request(app: Callable[..., Iterable[bytes]], n: int, bodies: list[bytes]
                    ) -> tuple[float, str]:
    """(µs of CPU per request, the last status line)."""
    status: list[str] = []

    def start_response(line: str, headers: list[tuple[str, str]], exc: Any = None) -> None:
        status.append(line)

    began = time.process_time()
    for i in range(n):
        out = app(_environ(bodies[i % len(bodies)]), start_response)
        b"".join(out)
        close = getattr(out, "close", None)
        if close is not None:
            close()
    return (time.process_time() - began) / n * 1e6, status[-1]


def _stub_store() -> None:
    from limiting.stores import store

    real = store.RedisStore.acquire
    recorded: list[Any] = []

    def acquire(self: Any, keys: list[str], args: Any) -> Any:
        if not recorded:
            recorded.append(real(self, keys, args))
        return recorded[0]

    store.RedisStore.acquire = acquire  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stub", action="store_true", help="ours' store answers from memory")
    parser.add_argument("--abuse", action="store_true",
                        help="ours refuses: one user over its limit (bench/abuse.py's (a))")
    parser.add_argument("-n", type=int, default=4000, help="requests per pass")
    opts = parser.parse_args()
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="bench-prom-"))
    with valkey() as url:
        policy = BENCH_POLICY
        if opts.abuse:
            from bench.abuse import USER_POLICY

            policy = os.path.join(tempfile.mkdtemp(prefix="bench-abuse-"), "limits.toml")
            with open(policy, "w") as f:
                f.write(USER_POLICY)
        os.environ.update(REDIS_URL=url, LIMITS_CONFIG=policy, REQUIRE_API_KEY="0")
        from app import create_app
        from bench.apps.nolimit import app as bare

        if opts.stub:
            _stub_store()
        ours = create_app()
        bodies = [json.dumps({"message": f"hello {u}", "user_id": "mallory" if opts.abuse
                              else f"user-{u}"}).encode() for u in range(1000)]
        for name, app in (("none", bare), ("ours", ours)):
            cpu_per_request(app, 1000, bodies)   # warm: scripts loaded, caches filled
            best = min(cpu_per_request(app, opts.n, bodies)[0] for _ in range(5))
            print(json.dumps({"contender": name, "stub": opts.stub, "abuse": opts.abuse,
                              "cpu us/request": round(best, 1),
                              "status": cpu_per_request(app, 1, bodies)[1]}))


if __name__ == "__main__":
    main()
