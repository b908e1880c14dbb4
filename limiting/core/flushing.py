"""One periodic flusher for work buffered off the hot path: the metrics' counts, the refusal
log's aggregated lines, the guard's pacing observations.

A daemon thread (a greenlet under gevent) runs ``flush`` one ``interval`` after it is woken,
and again while ``busy`` says there is more. Fork-safe: a gunicorn worker forks from a master
that may have used the same flusher, and gets no copy of its thread; its first ``wake``
starts one of its own, with a fresh event (the parent's thread may have held the old one's
lock at the fork).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger("limiter")

# Guards a flusher's start; a forked child gets a fresh one (the parent's may be held).
_starting = threading.Lock()


def _after_fork() -> None:
    global _starting
    _starting = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


class Flusher:
    """``flush`` within ``interval`` of a ``wake``, from one thread per process."""

    def __init__(self, name: str, interval: float, flush: Callable[[], object],
                 busy: Callable[[], bool] = lambda: False) -> None:
        self.name = name
        self.interval = interval
        self._flush = flush
        self._busy = busy
        self._pid = 0
        self._wake = threading.Event()

    def wake(self) -> None:
        """There is something to flush: it goes out within ``interval``. Cheap when the
        flusher is already awake (no lock), so the hot path may call it every time."""
        if self._pid != os.getpid():
            self._start()
        wake = self._wake
        if not wake.is_set():
            wake.set()

    def _start(self) -> None:
        with _starting:
            pid = os.getpid()
            if self._pid == pid:
                return
            self._wake = wake = threading.Event()
            self._pid = pid
        threading.Thread(target=self._run, args=(wake,), name=self.name, daemon=True).start()

    def _run(self, wake: threading.Event) -> None:
        while True:
            wake.wait()
            time.sleep(self.interval)
            wake.clear()   # before the flush: work buffered during it wakes the next round
            try:
                self._flush()
            except Exception:   # one failed flush must not end the flushing for good
                log.exception("%s: flush failed", self.name)
            if self._busy():
                wake.set()
