"""Both acquire backends on a clock the test sets: memory:// and the real Lua on Valkey.

Test-only. The Lua scripts run as shipped except for one line: the clock reads a test key
instead of Redis TIME. Key expiry, which Valkey keeps on its own real clock, is replayed on
the fake clock here, so both backends see the same state at the same fake time.
"""

from __future__ import annotations

import copy
import struct
from typing import Any

import redis

from limiting.stores.memory import MemoryStore
from limiting.stores.scripts import script_source
from limiting.stores.store import ScriptArgs

NOW_KEY = "__test_now_us"
CLOCK_LINE = "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])"
# The script reads a key it was not given. In a Cluster this would be a cross-slot access;
# the tests run on the single session Valkey, where every key is reachable from a script.
FAKE_CLOCK_LINE = f"local now = tonumber(redis.call('GET', '{NOW_KEY}'))"
SLOTS = 61


def clocked_source(name: str) -> str:
    """``lua/<name>.lua`` with its clock line, and nothing else, reading NOW_KEY."""
    original = script_source(name)
    lines = original.split("\n")
    hits = [i for i, line in enumerate(lines) if line == CLOCK_LINE]
    assert len(hits) == 1, f"{name}.lua: expected its clock line once, found {len(hits)}"
    lines[hits[0]] = FAKE_CLOCK_LINE
    text = "\n".join(lines)
    before, after = original.split("\n"), text.split("\n")
    assert len(before) == len(after)
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert changed == [(CLOCK_LINE, FAKE_CLOCK_LINE)]
    return text


def _window_parts(raw: bytes, wide: bool) -> tuple[float, float, list[float], dict[int, float]]:
    """(last slot, total, the 61 ring counters, the tail) of a "w"/"W" key: acquire.lua's
    layout (odd length: width byte, newest slot, total and counters n bytes wide, the tail as
    pairs of doubles) or the one before it (even: doubles head, 4- or 8-byte counters)."""
    if len(raw) % 2:
        n = raw[0]
        fmt = "d" if n == 8 else {1: "B", 2: "H", 4: "I"}.get(n)
        (last,) = struct.unpack_from("<d", raw, 1)
        if fmt is None:   # 3, 5 or 6 bytes: no struct code, read them as integers
            def at(off: int) -> float:
                return int.from_bytes(raw[off:off + n], "little")
        else:
            def at(off: int) -> float:
                return float(struct.unpack_from("<" + fmt, raw, off)[0])
        ring_end = 9 + n + SLOTS * n
        ring = [at(9 + n + k * n) for k in range(SLOTS)]
        tail = {int(k): c for k, c in struct.iter_unpack("<dd", raw[ring_end:])}
        return last, at(9), ring, tail
    last, total = struct.unpack_from("<dd", raw)
    fmt = "<61d" if wide else "<61I"
    ring_end = 16 + SLOTS * (8 if wide else 4)
    pairs = struct.iter_unpack("<dd" if wide else "<dI", raw[ring_end:])
    return last, total, list(struct.unpack_from(fmt, raw, 16)), {int(k): c for k, c in pairs}


def decode_window(raw: bytes, wide: bool) -> tuple[float, float, list[float]]:
    """(last slot, total, the 61 ring counters) of a "w"/"W" key as acquire.lua writes it."""
    last, total, ring, _tail = _window_parts(raw, wide)
    return last, total, ring


def window_tail(raw: bytes, wide: bool = False) -> dict[int, float]:
    """The waiters' charges a "w"/"W" key holds ahead of its ring: slot -> count."""
    return _window_parts(raw, wide)[3]


class ClockedMemory(MemoryStore):
    """memory:// with a settable clock."""

    name = "memory"

    def __init__(self, now_us: int = 0) -> None:
        super().__init__("memory://")
        self.now_us = now_us

    def _now_us(self) -> int:
        return self.now_us

    def settle(self, keys: list[str], args: ScriptArgs) -> Any:
        return self.run("settle", keys, args)

    def snapshot(self) -> Any:
        return copy.deepcopy(self._data)

    def restore(self, snap: Any) -> None:
        self._data = copy.deepcopy(snap)

    def raw(self, keys: list[str]) -> dict[str, Any]:
        """Every byte of live state of ``keys`` at the fake time, expiry included."""
        return {key: copy.deepcopy(item) if item is not None and item[0] > self.now_us
                else None for key, item in ((k, self._data.get(k)) for k in keys)}

    def window(self, key: str, wide: bool) -> tuple[float, float, list[float]] | None:
        item = self._data.get(key)
        if item is None or item[0] <= self.now_us:
            return None
        _, last, total, slots = item[1][:4]
        return last, total, list(slots)


class ClockedValkey:
    """The shipped scripts (clock line swapped) on Valkey, with key expiry on the fake clock.

    Each call is one MULTI: delete the keys past their fake expiry, set the clock, run the
    script, read back every key's PTTL (inside MULTI, Valkey's clock stands still, so a TTL
    the script just set reads back exactly). A fresh TTL is recorded against the fake clock
    and replaced by a very long real one; a TTL the script only carried over (settle's
    ``SET ... PX ttl``) stays long, and so is told apart from a fresh one.
    """

    name = "valkey"
    LONG_MS = 10**10                # ~4 months of real time: only the fake clock expires keys
    FRESH_BELOW = LONG_MS - 10**8   # a TTL under this was set by the script just now

    def __init__(self, client: redis.Redis, now_us: int = 0) -> None:
        self.client = client
        self.now_us = now_us
        self._acquire = client.register_script(clocked_source("acquire"))
        self._settle = client.register_script(clocked_source("settle"))
        self.expiry: dict[str, int] = {}
        client.flushdb()

    def _expire(self, pipe: Any) -> None:
        for key in [k for k, at in self.expiry.items() if at <= self.now_us]:
            pipe.delete(key)
            del self.expiry[key]

    def _call(self, script: Any, keys: list[str], args: ScriptArgs) -> Any:
        unique = list(dict.fromkeys(keys))
        pipe = self.client.pipeline(transaction=True)
        self._expire(pipe)
        pipe.set(NOW_KEY, self.now_us)
        script(keys=keys, args=list(args), client=pipe)
        for key in unique:
            pipe.pttl(key)
        out = pipe.execute()
        reply, ttls = out[-1 - len(unique)], out[len(out) - len(unique):]
        fresh = []
        for key, ms in zip(unique, ttls, strict=True):
            if ms == -2:
                self.expiry.pop(key, None)
            elif ms == -1:
                raise AssertionError(f"{key}: a script left a key without a TTL")
            elif ms < self.FRESH_BELOW:
                self.expiry[key] = self.now_us + ms * 1000
                fresh.append(key)
        if fresh:
            pipe = self.client.pipeline(transaction=False)
            for key in fresh:
                pipe.pexpire(key, self.LONG_MS)
            pipe.execute()
        return reply

    def acquire(self, keys: list[str], args: ScriptArgs) -> list[int]:
        return [int(x) for x in self._call(self._acquire, keys, args)]

    def settle(self, keys: list[str], args: ScriptArgs) -> Any:
        return self._call(self._settle, keys, args)

    def _expire_now(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        self._expire(pipe)
        pipe.execute()

    def snapshot(self) -> Any:
        self._expire_now()
        return {key: self.client.dump(key) for key in self.expiry}, dict(self.expiry)

    def restore(self, snap: Any) -> None:
        dumps, expiry = snap
        for key in set(self.expiry) | set(dumps):
            self.client.delete(key)
        for key, data in dumps.items():
            if data is not None:
                self.client.restore(key, self.LONG_MS, data)
        self.expiry = {k: at for k, at in expiry.items() if dumps.get(k) is not None}

    def raw(self, keys: list[str]) -> dict[str, Any]:
        """Every byte of live state of ``keys`` at the fake time, (fake) expiry included."""
        self._expire_now()
        return {key: (self.client.dump(key), self.expiry.get(key)) for key in keys}

    def window(self, key: str, wide: bool) -> tuple[float, float, list[float]] | None:
        self._expire_now()
        raw = self.client.get(key)
        return None if raw is None else decode_window(raw, wide)
