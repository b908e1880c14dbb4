"""gunicorn settings for the baseline contenders (none, flask-limiter, article).

Passed with ``-c`` so gunicorn never picks up the project's ./gunicorn.conf.py for them.
The harness sets BENCH_BIND, WEB_CONCURRENCY and BENCH_WORKER_CLASS.
"""

import os

bind = os.environ.get("BENCH_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
worker_class = os.environ.get("BENCH_WORKER_CLASS", "gevent")
# gthread only, as gunicorn.conf.py. gunicorn silently turns "sync" into gthread when
# threads > 1, so sync gets exactly one thread.
threads = 1 if worker_class == "sync" else int(os.environ.get("BENCH_THREADS", "64"))
worker_connections = 1000  # gevent: per worker
backlog = 2048
keepalive = 5
timeout = 60
graceful_timeout = 5
accesslog = None
loglevel = "warning"
