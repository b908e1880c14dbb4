"""A circuit breaker: stop hammering a store that is away, and probe it again with backoff.

Per process. While open, decisions go straight to the failure policy (or the local
fallback) in microseconds instead of each waiting out the time budget.
"""

from __future__ import annotations

import threading
import time


class Breaker:
    # The cap bounds how long a store that came back waits for its first probe: under 2 s.
    def __init__(self, threshold: int = 3, base: float = 0.1, cap: float = 1.0) -> None:
        self.threshold = threshold        # consecutive failures that open it
        self.base, self.cap = base, cap   # first and longest wait before a probe
        self._lock = threading.Lock()
        self._failures = 0
        self._open_until = 0.0
        self._backoff = base
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._failures >= self.threshold

    def allow(self) -> bool:
        """May a call go to the store now? When open, one probe at a time once the wait ends."""
        if self._failures < self.threshold:
            return True
        with self._lock:
            if self._probing or time.monotonic() < self._open_until:
                return False
            self._probing = True
            return True

    def success(self) -> None:
        if self._failures or self._probing:
            with self._lock:
                self._failures = 0
                self._backoff = self.base
                self._probing = False

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._failures >= self.threshold:
                # Each failed probe doubles the wait before the next one, up to the cap.
                self._open_until = time.monotonic() + self._backoff
                self._backoff = min(self.cap, self._backoff * 2)
            self._probing = False
