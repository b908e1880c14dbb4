"""memory://'s verdicts: one layer's part of an acquire, how a call's verdicts refuse, and
acquire.lua's ALTERNATIVES (fallback models) mirrored reply for reply (limiting/stores/memory.py
decides each layer)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.alternatives import Alternatives
from ..core.codec import AcquireReply

Commit = Callable[[AcquireReply, "list[Verdict]"], AcquireReply]


@dataclass(slots=True)
class Verdict:
    """One layer's part of an acquire: its answer, and the write it makes if all pass."""

    key: str
    remaining: float
    reset: float
    wait: float
    write: tuple[Any, float] | None    # (state, or a function of the delay; TTL in µs)
    cost: float
    before: float | None = None   # admitted into a future slot: its remaining before it
    slot_wait: float = 0.0        # ... and how long until that slot
    over: bool = False            # a shadow layer that would refuse

    def state(self) -> tuple[int, int]:
        """(remaining, reset_us) as acquire.lua answers them."""
        if self.before is not None:
            held = 0
        elif self.over:
            held = math.floor(self.remaining)
        else:
            held = max(0, math.floor(self.remaining))
        return held, max(0, math.ceil(self.reset))

    def unused(self, held: int) -> int:
        """Its remaining when another layer refused: nothing of this request charged."""
        return max(0, math.floor(self.before)) if self.before is not None else held + int(self.cost)


def worst_of(layers: list[Verdict]) -> tuple[float, int]:
    """As acquire.lua: the refusing layer (1-based; 0: none) and its wait (-1: never)."""
    worst_wait, worst = 0.0, 0
    for i, v in enumerate(layers, 1):
        if v.wait < 0:
            worst_wait, worst = -1, i
        elif v.wait > 0 and worst_wait >= 0 and v.wait > worst_wait:
            worst_wait, worst = v.wait, i
    return worst_wait, worst


def refused(reply: AcquireReply, layers: list[Verdict], worst: int, worst_wait: float
             ) -> AcquireReply:
    """Nothing is charged: layers that would have passed report what they still hold."""
    reply.allowed, reply.refused = False, worst
    reply.wait_us = math.ceil(worst_wait)
    for i, v in enumerate(layers):
        if v.write is not None:
            reply.states[i] = (v.unused(reply.states[i][0]), reply.states[i][1])
    return reply


def alternatives(alts: Alternatives, decide: Callable[..., Verdict], commit: Commit,
                 now: int) -> list[int]:
    """As acquire.lua's ALTERNATIVES: the asked model's layers; refused, and by none of the
    layers every alternative shares, each alternative's own beside those. ``decide(i,
    cost=None)``: layer i's verdict (at ``cost``); ``commit``: charges an admitted reply."""
    layers = [decide(i) for i in range(alts.asked)]
    reply = AcquireReply(True, 0, 0, now, [v.state() for v in layers], served=0)
    worst_wait, worst = worst_of(layers)
    if not worst:
        return commit(reply, layers).encode()
    shared = alts.asked - alts.guard
    variant = {i for _, _, pairs in alts.each for i, _ in pairs}
    variant.update(range(shared, alts.asked))
    answer = refused(reply, layers, worst, worst_wait)
    if any(v.wait != 0 for i, v in enumerate(layers) if i not in variant):
        return answer.encode()
    soonest = worst_wait
    for j, (first, size, pairs) in enumerate(alts.each, 1):
        mine = list(layers[:shared])
        for i, cost in pairs:
            mine[i] = decide(i, cost)
        mine += [decide(first + k) for k in range(size)]
        wait, bad = worst_of([mine[i] for i, _ in pairs] + mine[shared:])
        if not bad:
            served = AcquireReply(True, 0, 0, now, [v.state() for v in mine], served=j)
            return commit(served, mine).encode()
        if soonest < 0 or 0 <= wait < soonest:
            soonest = wait
    answer.wait_us = math.ceil(soonest)
    return answer.encode()
