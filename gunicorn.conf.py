"""This app's gunicorn settings: the library's (limiting/gunicorn.py: gevent workers, the
embedded Valkey without REDIS_URL, the metrics folder, the policy check and HUP reload), then
its own. An adopting app's config file does the same; or runs
``gunicorn -c python:limiting.gunicorn yourapp:app`` with no file of its own."""

from limiting.gunicorn import *  # noqa: F403

proc_name = "flask-llm-limiter"
