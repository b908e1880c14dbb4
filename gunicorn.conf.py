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
from typing import Any

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


def on_starting(server: Any) -> None:
    """Metrics files for every worker; without REDIS_URL, one Valkey every worker shares;
    the policy file checked, and the copy the workers load made."""
    folder = _instance()
    # Workers write their counts here and /metrics adds them up; a new start starts at zero.
    metrics_dir = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or folder / "prometheus")
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    # On the arbiter, not in this file's globals: HUP runs this file again, resetting them.
    server.limits_source = Path(os.environ.get("LIMITS_CONFIG") or "limits.toml").resolve()
    _keep_policy(server, reloading=False)
    server.embedded_store = None
    if os.environ.get("REDIS_URL"):
        return
    server.embedded_store = spawn(folder)
    os.environ["REDIS_URL"] = socket_url(folder)


def on_reload(server: Any) -> None:
    """HUP: new workers load the policy file if it is good, else the last good one."""
    _keep_policy(server, reloading=True)


def _keep_policy(server: Any, reloading: bool) -> None:
    from limiting.reloading import keep

    kept, what = keep(server.limits_source, _instance(), reloading)
    if what.startswith("accepted"):
        os.environ["LIMITS_CONFIG"] = str(kept)
        server.log.info("policy %s", what)
    elif reloading:
        # The workers keep loading the copy accepted last: the old policy keeps serving.
        server.log.error("policy %s; still serving %s", what, kept)
    # A bad file at start: the workers read it and fail with its reason, as without HUP.


def _instance() -> Path:
    here = Path(__file__).resolve().parent
    return Path(os.environ.get("LIMITER_INSTANCE") or here / "instance").resolve()


def post_worker_init(worker: object) -> None:
    """The SDKs load in each worker before it serves, not on its first upstream call."""
    from limiting.providers.clients import warm

    warm()


def on_exit(server: Any) -> None:
    stop_spawned(getattr(server, "embedded_store", None))
