"""What ``RateLimiter(app)`` limits by and where it keeps counts, when the app says little or
nothing: the zero-configuration path of an app that just did ``pip install``.

Policy, first found: ``RateLimiter(app, policy=...)``, ``app.config["LIMITS"]`` (a dict with
the policy file's tables), ``LIMITS_CONFIG`` (app.config, then the environment: a path that
must exist), ``limits.toml`` in the app's root folder, the built-in policy.

Store: ``REDIS_URL`` (app.config, then the environment); else the embedded Valkey of the app's
instance folder when it answers (``gunicorn -c python:limiting.gunicorn`` runs it) or when an
operator command runs (`flask limits|keys|spend|audit`: so `flask keys create` keeps what it
makes); else memory:// in this process (`flask run`, tests), said once in the log.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import click
from flask import Flask

from ..core.policy import Policy, PolicyError, load_policy, parse_policy
from ..locations import policy_path
from ..stores.embedded import answers, instance_dir, resolve_store_url, socket_url
from ..stores.storage import open_store
from ..stores.store import Store

PER_PROCESS = ("no REDIS_URL: limits are per process (memory://) until REDIS_URL is set; "
               "`gunicorn -c python:limiting.gunicorn` gives every worker one shared store")
# The command groups RateLimiter adds to `flask` (tests/test_configured.py keeps them in step).
OPERATOR_COMMANDS = frozenset({"limits", "keys", "spend", "audit", "alerts"})
_said: list[bool] = []   # the per-process warning, once per process (not per app or test)


def setting(app: Flask, name: str, default: str = "") -> str:
    """app.config[name], else the environment's, else ``default``."""
    value = app.config.get(name)
    if value is None:
        value = os.environ.get(name, default)
    return str(value)


def app_policy(app: Flask, given: Policy | None = None) -> Policy:
    """The policy by the order above; a bad one raises PolicyError naming where it came from."""
    if given is not None:
        return given
    table = app.config.get("LIMITS")
    if table is not None:
        if not isinstance(table, Mapping):
            raise PolicyError('app.config["LIMITS"]: (config): must be a dict with the policy '
                              f"file's tables, got {type(table).__name__}")
        return parse_policy(table, 'app.config["LIMITS"]')
    path, _named = policy_path(setting(app, "LIMITS_CONFIG") or None, Path(app.root_path))
    return load_policy(path)   # a named file that is missing fails here, with its path


def app_store(app: Flask, timeout: float) -> Store:
    """The store by the order above. An operator's command waits up to OPERATOR_TIMEOUT for
    it: the policy's budget is a request's, and a loaded store that answers in 80 ms must
    not make `flask limits show` say it is unreachable."""
    url = setting(app, "REDIS_URL")
    operator = operator_command()
    if operator:
        timeout = max(timeout, OPERATOR_TIMEOUT)
    if not url:
        folder = instance_dir(app)
        if answers(folder):
            url = socket_url(folder)
        elif operator:
            url = resolve_store_url(app, "")   # started here, stopped when the command ends
        else:
            if not _said:
                _said.append(True)
                logging.getLogger("limiter.store").warning(PER_PROCESS)
            url = "memory://"
    return open_store(url, timeout=timeout)


OPERATOR_TIMEOUT = 5.0


def operator_command() -> bool:
    """Is this process `flask ... limits|keys|spend|audit ...`? Flask loads the app before it
    can find those groups (the app adds them), so the command line says which one runs."""
    if click.get_current_context(silent=True) is None:
        return False
    words = iter(sys.argv[1:])
    for word in words:
        if word in ("--app", "-A", "--env-file", "-e"):
            next(words, None)     # the option's value, not a command
        elif not word.startswith("-"):
            return word in OPERATOR_COMMANDS
    return False
