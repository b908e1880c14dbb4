"""The one periodic flusher (limiting/core/flushing.py) that the metrics' counts, the refusal
log and the guard's pacing writer share: it flushes after a wake, keeps going while busy,
survives a failing flush, and a forked child flushes with a thread of its own."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from limiting.core.flushing import Flusher

PATIENCE = 30.0   # a deadline for a loaded box; each wait is done in ~0.01 s


def eventually(check: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + PATIENCE
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_a_wake_flushes_once_and_a_busy_flusher_goes_on() -> None:
    flushed: list[int] = []
    left = [3]

    def flush() -> None:
        flushed.append(left[0])
        left[0] = max(0, left[0] - 1)

    flusher = Flusher("t-busy", 0.01, flush, busy=lambda: left[0] > 0)
    assert flushed == []                  # nothing until woken
    flusher.wake()
    assert eventually(lambda: flushed == [3, 2, 1])
    time.sleep(0.05)
    assert flushed == [3, 2, 1]           # not busy any more: asleep until the next wake
    flusher.wake()
    assert eventually(lambda: flushed == [3, 2, 1, 0])


def test_a_failing_flush_does_not_stop_the_flusher() -> None:
    calls: list[int] = []

    def flush() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the store went away")

    flusher = Flusher("t-fail", 0.01, flush)
    flusher.wake()
    assert eventually(lambda: len(calls) == 1)
    flusher.wake()
    assert eventually(lambda: len(calls) == 2)


def test_one_thread_per_process_and_a_forked_child_starts_its_own() -> None:
    flushed: list[int] = []
    flusher = Flusher("t-fork", 0.01, lambda: flushed.append(os.getpid()))
    for _ in range(100):
        flusher.wake()
    assert eventually(lambda: os.getpid() in flushed)
    assert sum(t.name == "t-fork" for t in threading.enumerate()) == 1
    pid = os.fork()
    if pid == 0:   # the child: the parent's thread did not come along
        ok = False
        try:
            flusher.wake()
            ok = eventually(lambda: os.getpid() in flushed)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert sum(t.name == "t-fork" for t in threading.enumerate()) == 1
