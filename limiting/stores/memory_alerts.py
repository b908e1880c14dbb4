"""lua/alerts.lua in this process, reply for reply, for memory:// (held under its lock)."""

from __future__ import annotations

from typing import Any

from ..core.codec import as_text
from .store import ScriptArgs


class AlertsMirror:
    """The once-claims and the outbox of one memory:// store."""

    def __init__(self) -> None:
        self.claims: dict[str, float] = {}            # key -> until (ms)
        self.due: dict[str, float] = {}               # id -> due (ms)
        self.bodies: dict[str, bytes] = {}
        self.attempts: dict[str, int] = {}

    def run(self, keys: list[str], args: ScriptArgs, now_ms: float) -> Any:
        cmd = as_text(args[0])
        if cmd == "once":
            key = keys[0]
            if self.claims.get(key, 0) > now_ms:
                return 0
            self.claims = {k: t for k, t in self.claims.items() if t > now_ms}
            self.claims[key] = now_ms + float(as_text(args[1]))
            return 1
        event = as_text(args[1]) if len(args) > 1 else ""
        if cmd == "put":
            body = args[2]
            self.bodies[event] = body if isinstance(body, bytes) else as_text(body).encode()
            self.due[event] = float(as_text(args[3]))
            return 1
        if cmd == "due":
            return self._take(float(event), float(as_text(args[2])), int(as_text(args[3])))
        if cmd == "done":
            for table in (self.due, self.bodies, self.attempts):
                table.pop(event, None)
            return 1
        if cmd == "retry":
            if event in self.bodies:
                self.attempts[event] = self.attempts.get(event, 0) + 1
                self.due[event] = float(as_text(args[2]))
            return 1
        raise ValueError(f"alerts.lua: unknown command {cmd}")

    def _take(self, now: float, lease: float, limit: int) -> list[Any]:
        # As ZRANGEBYSCORE: by due time, then by id.
        ready = sorted((t, i) for i, t in self.due.items() if t <= now)[:limit]
        out: list[Any] = []
        for _, event in ready:
            self.due[event] = now + lease
            out += [event.encode(), self.bodies[event], self.attempts.get(event, 0)]
        return out
