"""The Lua scripts' calling convention, and the only module that knows its positions.

acquire.lua takes 4 arguments per layer (kind, a, b, cost) and answers {allowed, refusing
layer (1-based, 0: none), wait_us, now_us, then remaining and reset_us per layer}; settle.lua
takes the acquire's now_us, then 3 arguments per layer (kind, b, delta or lease id). The
Redis store sends what this module encodes and memory:// decodes it, so the two can never
read a call differently.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .windows import month_bounds

ACQUIRE_ARGS = 4      # kind, a, b, cost
SETTLE_ARGS = 3       # kind, b, delta
REPLY_HEAD = 4        # allowed, refusing layer, wait_us, now_us


def num_arg(value: float) -> str:
    """A number as the scripts read it: an integer without a point when it is one."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --- acquire --------------------------------------------------------------------------------------


def layer_args(kind: str, a: float, b: float, cost: str) -> list[bytes]:
    """One layer's four arguments. ``cost``: units to charge, "0" to only look, or for a
    concurrency layer the lease id ("-" to only look)."""
    return [kind.encode(), num_arg(a).encode(), num_arg(b).encode(), cost.encode()]


def with_costs(template: Sequence[bytes], costs: Mapping[int, str]) -> list[bytes]:
    """A copy of a plan's encoded arguments with the cost of layer ``i`` set to ``costs[i]``."""
    args = list(template)
    for i, cost in costs.items():
        args[i * ACQUIRE_ARGS + 3] = cost.encode()
    return args


@dataclass(frozen=True, slots=True)
class LayerCall:
    """One layer of an acquire call, decoded (memory:// runs it in Python)."""

    kind: str
    a: float
    b: float
    cost: str             # a number, or a lease id for "c" layers

    @property
    def units(self) -> float:
        return float(self.cost)


def decode_acquire(args: Sequence[Any]) -> list[LayerCall]:
    return [LayerCall(_text(args[i]), float(args[i + 1]), float(args[i + 2]),
                      _text(args[i + 3]))
            for i in range(0, len(args), ACQUIRE_ARGS)]


@dataclass(slots=True)   # not frozen: built on every request, and frozen __init__ is slower
class AcquireReply:
    """What acquire.lua answered. ``states`` holds (remaining, reset_us) per layer it reached
    (an edge refusal ends the call before the later layers)."""

    allowed: bool
    refused: int          # 1-based index of the refusing layer; 0 when allowed
    wait_us: int          # until this request would pass; -1: never (its cost is over a limit)
    now_us: int           # the store's clock at the call: which window slot it charged
    states: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def parse(cls, raw: Sequence[Any]) -> AcquireReply:
        # Integers already (Redis replies and memory:// alike); slicing keeps it in C.
        states = list(zip(raw[REPLY_HEAD::2], raw[REPLY_HEAD + 1::2], strict=True))
        return cls(raw[0] == 1, raw[1], raw[2], raw[3], states)

    def encode(self) -> list[int]:
        out = [1 if self.allowed else 0, self.refused, self.wait_us, self.now_us]
        for remaining, reset in self.states:
            out += [remaining, reset]
        return out

    def refused_after(self, n: int) -> bool:
        """Did a layer past the first ``n`` refuse (e.g. the model's guard behind a user's)?"""
        return not self.allowed and self.refused > n

    def first(self, n: int) -> AcquireReply:
        """The reply as the first ``n`` layers saw it: refused only if one of them refused.
        Nothing was charged either way when any layer refused."""
        if self.refused_after(n):
            return AcquireReply(True, 0, 0, self.now_us, self.states[:n])
        return AcquireReply(self.allowed, self.refused, self.wait_us, self.now_us,
                            self.states[:n])


# --- settle ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class SettleCall:
    """One settle.lua call: corrections to the layers an acquire at ``charged_at`` charged.

    Kinds: "w"/"W" add ``delta`` units to the charged slot (b = window in µs); "m" to the
    count of the month charged, if it still is the stored one (b = that month); "b" puts
    tokens back into a bucket (b = capacity); "c" releases the lease ``delta``; "r" renews
    it (b = the lease TTL in µs)."""

    charged_at: int
    keys: list[str] = field(default_factory=list)
    items: list[tuple[str, float, str | float]] = field(default_factory=list)

    def add(self, key: str, kind: str, b: float, delta: str | float) -> None:
        if kind == "m":
            # A month count names the month charged (the acquire's, by the store's clock),
            # so settle.lua need not know the calendar.
            b = month_bounds(self.charged_at)[0]
        self.keys.append(key)
        self.items.append((kind, b, delta))

    @property
    def args(self) -> list[str | int | float]:
        out: list[str | int | float] = [self.charged_at]
        for kind, b, delta in self.items:
            out += [kind, b, delta]
        return out

    def __bool__(self) -> bool:
        return bool(self.keys)


def decode_settle(args: Sequence[Any]) -> tuple[float, list[tuple[str, float, str]]]:
    """(charged_at, [(kind, b, delta or lease id)]) of a settle call, for memory://."""
    items = [(_text(args[i]), float(args[i + 1]), _text(args[i + 2]))
             for i in range(1, len(args), SETTLE_ARGS)]
    return float(args[0]), items


def encode_layers(calls: Iterable[tuple[str, float, float, str]]) -> tuple[bytes, ...]:
    """The arguments of several layers, in order."""
    out: list[bytes] = []
    for kind, a, b, cost in calls:
        out += layer_args(kind, a, b, cost)
    return tuple(out)
