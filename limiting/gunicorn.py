"""gunicorn settings and hooks for an app that uses the limiter:
``gunicorn -c python:limiting.gunicorn yourapp:app``.

What they add to plain gunicorn: without REDIS_URL, one embedded Valkey that every worker
shares (socket and data under the app's instance folder, or LIMITER_INSTANCE), so limits are
exact across workers and `flask --app yourapp limits ...` reaches the same store; the Prometheus
multiprocess folder; the policy file checked by the master at start and on ``kill -HUP``; gevent
workers; and on SIGTERM the store stopped with the rest.

Your own config file keeps its settings and adds ours with ``from limiting.gunicorn import *``;
a hook of your own with one of these names calls ours first (``limiting.gunicorn.on_starting``).

Worker class by measurement (bench/, README "Benchmark"): sync workers serve one call each,
so 4 workers answer 4 calls at once; gevent holds a thousand waiting calls per worker on one
core's worth of CPU. GUNICORN_WORKER_CLASS overrides, e.g. for the benchmark's comparison.

Standard library only at import: the worker class is known only once gunicorn has read every
config file. The master then imports the provider SDKs once (their pydantic types cost ~5 s of
CPU per process) and flask, Flask-Limiter and redis-py (~0.7 s), and every worker forks with
them loaded; for gevent workers it first patches socket and ssl, as gevent asks of anything
imported before the fork. Nothing else is imported in the master: the app's folders come from
its module's import spec (limiting/locations.py).
"""

from __future__ import annotations

import gc
import importlib
import os
import shutil
from pathlib import Path
from typing import Any

from .locations import instance_override, module_folders, policy_path
from .provider_keys import keyed_providers
from .stores.embedded import socket_url, spawn, stop_spawned

__all__ = [
    "accesslog", "backlog", "bind", "errorlog", "graceful_timeout", "keepalive", "loglevel",
    "on_exit", "on_reload", "on_starting", "post_worker_init", "threads", "timeout",
    "worker_class", "worker_connections", "workers",
]

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


# Not the app itself (it opens the store and reads the policy in each worker, and a HUP reloads
# it), nor prometheus_client (it reads PROMETHEUS_MULTIPROC_DIR, set below, at import).
_WEB_STACK = ("flask", "flask_limiter", "redis")


def on_starting(server: Any) -> None:
    """Metrics files for every worker; without REDIS_URL, one Valkey every worker shares;
    the policy checked, and the copy the workers load made."""
    _preload(server)
    # On the arbiter, not in module globals: what HUP needs survives a reload of the config.
    server.limits_root, server.limits_instance = _folders(server)
    server.limits_named = os.environ.get("LIMITS_CONFIG") or None
    _own_control_socket(server)
    # Workers write their counts here and /metrics adds them up; a new start starts at zero.
    metrics_dir = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR")
                       or server.limits_instance / "prometheus")
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    _keep_policy(server, reloading=False)
    server.embedded_store = None
    if os.environ.get("REDIS_URL"):
        return
    server.embedded_store = spawn(server.limits_instance)
    os.environ["REDIS_URL"] = socket_url(server.limits_instance)
    server.log.info("no REDIS_URL: the workers share the embedded Valkey at %s",
                    os.environ["REDIS_URL"])


def on_reload(server: Any) -> None:
    """HUP: new workers load the policy if it is good, else the last good one."""
    _keep_policy(server, reloading=True)


def post_worker_init(worker: Any) -> None:
    """Each worker makes its own SDK clients (their connection pools) before it serves, not
    on its first upstream call; the SDKs themselves came loaded from the master."""
    from .providers.clients import warm

    warm()


def on_exit(server: Any) -> None:
    """The embedded store stops with the master: no process of ours outlives it."""
    stop_spawned(getattr(server, "embedded_store", None))


def _preload(server: Any) -> None:
    """Import the SDKs and the web stack in the master, once: a worker that imported them
    itself spent ~5 s of CPU on the SDKs and ~0.7 s on flask, Flask-Limiter and redis-py before
    it served (4 workers, 20 s of a small box at every start, HUP and recycle) and held its own
    copy of them. gevent workers patch the whole library after the fork; socket and ssl are
    patched here first, so nothing imported here keeps the unpatched ssl or socket (gevent's
    MonkeyPatchWarning). threading, select, os and signal stay as the arbiter expects them.
    gc.freeze keeps the collector from touching, and so copying, the shared pages."""
    if os.environ.get("LIMITER_PRELOAD_SDKS", "1") == "0":
        return
    if any(c.__module__.startswith("gunicorn.workers.ggevent")
           for c in type.mro(server.worker_class)):
        from gevent import monkey

        monkey.patch_socket()
        monkey.patch_ssl()
    # The SDKs that providers/clients.warm makes clients of, then what every app of ours imports.
    for name in (*keyed_providers(), *_WEB_STACK):
        importlib.import_module(name)
    gc.freeze()


def _keep_policy(server: Any, reloading: bool) -> None:
    """The policy file the app would read (LIMITS_CONFIG, else limits.toml in its root, else
    the built-in one), checked; the workers load the copy accepted last."""
    from .reloading import keep

    source, _named = policy_path(server.limits_named, server.limits_root)
    kept, what = keep(source.resolve(), server.limits_instance, reloading)
    if what.startswith("accepted"):
        os.environ["LIMITS_CONFIG"] = str(kept)
        server.log.info("policy %s", what)
    elif reloading:
        # The workers keep loading the copy accepted last: the old policy keeps serving.
        server.log.error("policy %s; still serving %s", what, kept)
    else:
        # A bad file at start: the workers read it and fail with its reason, as without HUP.
        os.environ["LIMITS_CONFIG"] = str(source)


def _own_control_socket(server: Any) -> None:
    """gunicorn's default control socket is one path per user per machine, so a second app
    would take over the first's; unless the config names one, it lives in the instance folder
    (when that path fits a socket's 108 bytes)."""
    setting = server.cfg.settings.get("control_socket")
    path = server.limits_instance / "gunicorn.ctl"
    if setting is not None and setting.value == setting.default and len(str(path)) < 100:
        server.limits_instance.mkdir(parents=True, exist_ok=True)
        server.cfg.set("control_socket", str(path))


def _folders(server: Any) -> tuple[Path, Path]:
    """The app's root and instance folders, from the module gunicorn was told to serve."""
    uri = getattr(server.app, "app_uri", None) or server.cfg.wsgi_app or ""
    module = str(uri).partition(":")[0].strip()
    if module:
        root, instance = module_folders(module)
    else:   # a paste deployment: the folder gunicorn runs in
        root = Path.cwd()
        instance = root / "instance"
    return root, instance_override() or instance
