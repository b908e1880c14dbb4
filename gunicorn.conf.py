"""gunicorn settings for an LLM gateway: calls that wait 5-30 s upstream and stream answers.

Worker class by measurement (bench/, README "Benchmark"): sync workers serve one call each,
so 4 workers answer 4 calls at once; gevent holds a thousand waiting calls per worker on one
core's worth of CPU. GUNICORN_WORKER_CLASS overrides, e.g. for the benchmark's comparison.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Standard library only: nothing here may import ssl before gevent patches the workers.
from limiting.stores.embedded import socket_url, spawn, stop_spawned

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "gevent")
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "1000"))  # per gevent worker
threads = int(os.environ.get("GUNICORN_THREADS", "64"))                 # per gthread worker
backlog = 2048
# For async workers this is a heartbeat, not a request deadline; a stream may run far longer.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
graceful_timeout = 30   # let in-flight calls and streams finish on SIGTERM
keepalive = 5
accesslog = os.environ.get("ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")

_embedded = None


def on_starting(server: object) -> None:
    """Metrics files for every worker; without REDIS_URL, one Valkey every worker shares."""
    global _embedded
    here = Path(__file__).resolve().parent
    folder = Path(os.environ.get("LIMITER_INSTANCE") or here / "instance").resolve()
    # Workers write their counts here and /metrics adds them up; a new start starts at zero.
    metrics_dir = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or folder / "prometheus")
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    if os.environ.get("REDIS_URL"):
        return
    _embedded = spawn(folder)
    os.environ["REDIS_URL"] = socket_url(folder)


def post_worker_init(worker: object) -> None:
    """The SDKs load in each worker before it serves, not on its first upstream call."""
    from providers.clients import warm

    warm()


def on_exit(server: object) -> None:
    stop_spawned(_embedded)
