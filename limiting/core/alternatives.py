"""acquire.lua's ALTERNATIVES (fallback models): the part of the codec (limiting/core/codec.py)
that encodes them behind a call's deadline and decodes them for memory://.

Behind the deadline: count, g0 (the asked model's guard: the last g0 of its layers), then per
alternative g (its guard's layers, sent behind every layer of the asked call, in order), m,
and m pairs (layer, cost): the layers before the guard whose cost differs at its prices
(1-based). The reply ends with the alternative that served (0: the asked model, or refused).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .codec import ACQUIRE_ARGS, AcquireCall, as_text


def with_alternatives(call: AcquireCall, max_wait_us: int, guard_size: int,
                      alternatives: Sequence[tuple[AcquireCall, AcquireCall | None]]
                      ) -> AcquireCall:
    """One call deciding the asked model (``call``, its guard its last ``guard_size`` layers)
    or the first of its ``alternatives`` that passes: each (its version of ``call``'s layers
    before the guard, the same keys at its prices; its guard). Only the layers whose cost
    differs are sent again (acquire.lua's ALTERNATIVES); the reply ends with the number of
    the alternative that served (0: the asked model)."""
    shared = call.size - guard_size
    keys, args = list(call.keys), list(call.args)
    trailer: list[bytes] = [str(len(alternatives)).encode(), str(guard_size).encode()]
    for head, guard in alternatives:
        changed = [(i, head.args[i * ACQUIRE_ARGS + 3]) for i in range(shared)
                   if head.args[i * ACQUIRE_ARGS + 3] != call.args[i * ACQUIRE_ARGS + 3]]
        size = 0 if guard is None else guard.size
        trailer += [str(size).encode(), str(len(changed)).encode()]
        for i, cost in changed:
            trailer += [str(i + 1).encode(), cost]
        if guard is not None:
            keys += guard.keys
            args += guard.args
    return AcquireCall(keys, [*args, str(int(max_wait_us)).encode(), *trailer])


@dataclass(frozen=True, slots=True)
class Alternatives:
    """acquire.lua's ALTERNATIVES as memory:// reads them: how many layers the asked model's
    call has, its guard's, and per alternative its guard's layers (first index, count) and
    the layers it charges another cost ((index, cost), 0-based)."""

    asked: int
    guard: int
    each: tuple[tuple[int, int, tuple[tuple[int, str], ...]], ...]


def decode_alternatives(args: Sequence[Any], keys: int) -> Alternatives | None:
    """The ALTERNATIVES behind the deadline of a call over ``keys`` keys; None: none sent."""
    at = keys * ACQUIRE_ARGS + 1
    if len(args) <= at:
        return None
    count, guard = int(as_text(args[at])), int(as_text(args[at + 1]))
    at += 2
    parts = []
    for _ in range(count):
        size, changed = int(as_text(args[at])), int(as_text(args[at + 1]))
        pairs = tuple((int(as_text(args[at + 2 + 2 * k])) - 1, as_text(args[at + 3 + 2 * k]))
                      for k in range(changed))
        parts.append((size, pairs))
        at += 2 + 2 * changed
    asked = keys - sum(size for size, _ in parts)
    each, first = [], asked
    for size, pairs in parts:
        each.append((first, size, pairs))
        first += size
    return Alternatives(asked, guard, tuple(each))
