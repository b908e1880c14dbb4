"""Failed credentials counted per client IP in the shared store, so an operator's secret
(ADMIN_TOKEN, METRICS_TOKEN) cannot be guessed at line speed from routes the edge exempts.

Only failures count: an operator with the right token never uses up anything. Once an IP has
failed ``limit`` times in a window, every attempt from it is refused until the window ends,
the right token included; otherwise a 200 among the 429s would tell a guesser it had won.
"""

from __future__ import annotations

import math

from ..core.codec import AcquireReply
from ..core.decision import from_reply
from ..core.layers import compile_plan, window
from ..core.naming import user_tag
from ..stores.store import Store

FAILURES_PER_WINDOW = 10
WINDOW_SECONDS = 60


class AuthFailures:
    """A strict sliding window of failures per IP: one key, one script call per attempt."""

    def __init__(self, store: Store, limit: int = FAILURES_PER_WINDOW,
                 seconds: int = WINDOW_SECONDS, namespace: str = "rl:") -> None:
        self.store = store
        self.namespace = namespace
        # Fail closed: while the store is away, nobody gets to guess uncounted.
        layer = window("auth-failures", "", limit, seconds, "fail_closed")
        self._look = compile_plan(None, (layer,), cost=0)
        self._count = compile_plan(None, (layer,), cost=1)

    def _key(self, ip: str) -> list[str]:
        # user_tag, as for user ids: no value can pick another Cluster slot's hash tag.
        return [f"{self.namespace}auth-failures:{{{user_tag(ip)}}}"]

    def attempt(self, ip: str, succeeded: bool) -> int:
        """Record one attempt of ``ip``: a failure is counted unless the window is full.

        Returns 0 to answer as usual (200, or 401 for a failure), else the Retry-After of a
        429. Raises StoreUnavailable (the caller answers 503).
        """
        if succeeded:
            decision = from_reply(self._look, AcquireReply.parse(
                self.store.acquire(self._key(ip), self._look.args)))
            state = decision.states[0] if decision.states else None
            if state is None or state.remaining > 0:
                return 0
            # The window is full: the right token waits too (see the module's docstring).
            return max(1, math.ceil(state.reset))
        # All or nothing: a refused failure is not counted, so the wait is exact.
        decision = from_reply(self._count, AcquireReply.parse(
            self.store.acquire(self._key(ip), self._count.args)))
        return 0 if decision.allowed else max(1, decision.retry_after)
