"""Starting and always stopping the processes the bench runs (each in its own process group)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

_live: list[Managed] = []


class _Served(Protocol):
    server_worker: str | None


R = TypeVar("R", bound=_Served)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


@dataclass
class Managed:
    """A child process started in a new session, so its whole group can be stopped."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)
    drain_thread: threading.Thread | None = field(default=None, repr=False)

    def start(self, capture_stdout: bool = False) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture_stdout else log,
                stderr=log,
                start_new_session=True,
            )
        _live.append(self)

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, grace: float = 8.0) -> None:
        proc = self.proc
        if proc is None:
            return
        try:
            _signal_group(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
            # The leader may be gone while workers linger: always sweep the group.
            _signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=3)
        finally:
            if self.drain_thread is not None:
                self.drain_thread.join(timeout=2)
                self.drain_thread = None
            if proc.stdout is not None:
                proc.stdout.close()
            self.proc = None
            if self in _live:
                _live.remove(self)

    def gunicorn_worker(self) -> str | None:
        """The worker class gunicorn reports using ("Using worker: X"), if it logged one."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return None
        found = re.findall(r"Using worker: (\S+)", text)
        return found[-1] if found else None

    def finished(self, result: R) -> R:
        """``result`` of a run, tagged with the worker class that served it; NotReady when
        the process died during the run (its numbers then measure a crash)."""
        if self.exited() is not None:
            raise NotReady(f"died during the run: {self.reason()}")
        result.server_worker = self.gunicorn_worker()
        return result

    def reason(self) -> str:
        code = self.exited()
        where = tail(self.log_path)
        head = f"exited with code {code}" if code is not None else "not ready"
        last = where.splitlines()[-1].strip() if where else ""
        return f"{head}: {last} (log {self.log_path})" + (f"\n{where}" if where else "")


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_all() -> None:
    for managed in list(_live):
        managed.stop(grace=3.0)


def post_json(port: int, path: str, body: dict, timeout: float,
              headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(
            "POST", path, body=json.dumps(body),
            headers={"Content-Type": "application/json", **(headers or {})}
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class NotReady(Exception):
    pass


def wait_ready(managed: Managed, port: int, body: dict,
               headers: dict[str, str] | None = None, deadline_s: float = 30.0) -> None:
    """Block until POST /chat answers 200, or raise NotReady with the reason."""
    deadline = time.monotonic() + deadline_s
    last = "no answer"
    while time.monotonic() < deadline:
        if managed.exited() is not None:
            raise NotReady(managed.reason())
        try:
            status, payload = post_json(port, "/chat", body, timeout=10.0, headers=headers)
        except (OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
            continue
        if status == 200:
            return
        # A worker may still be booting or connecting: retry until the deadline.
        last = f"POST /chat answered {status}: {payload[:300].decode(errors='replace')}"
        time.sleep(0.5)
    raise NotReady(f"no 200 within {deadline_s:.0f}s, last: {last}; {managed.reason()}")


def read_line(managed: Managed, prefix: str, timeout: float) -> str:
    """The first stdout line of a process that starts with prefix (bounded in time).

    The rest of its stdout is then copied to its log by a daemon thread, so a chatty
    process never blocks on a full pipe.
    """
    assert managed.proc is not None and managed.proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(managed.proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            chunk = os.read(managed.proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            for line in buf.decode(errors="replace").splitlines():
                if line.startswith(prefix):
                    _drain(managed)
                    return line
    finally:
        sel.close()
    raise NotReady(
        f"no '{prefix}' line within {timeout:.0f}s; got {buf[:200]!r}; {managed.reason()}"
    )


def _drain(managed: Managed) -> None:
    assert managed.proc is not None and managed.proc.stdout is not None
    fd = managed.proc.stdout.fileno()
    log_path = managed.log_path

    def copy() -> None:
        try:
            with open(log_path, "ab") as log:
                while chunk := os.read(fd, 65536):
                    log.write(chunk)
        except OSError:
            pass

    managed.drain_thread = threading.Thread(target=copy, name=f"drain-{managed.name}", daemon=True)
    managed.drain_thread.start()
