"""What the acquire script said, per layer, and the one answer a request gets."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .codec import AcquireReply
from .layers import CompiledPlan, Layer, policy_header


@dataclass(slots=True)  # not frozen: built on every request, and frozen __init__ is slower
class LayerState:
    layer: Layer
    remaining: int
    reset: float          # seconds until this layer is back to full


@dataclass(slots=True)  # not frozen: built on every request, and frozen __init__ is slower
class Decision:
    """One verdict on a request over every layer it met (``acquire`` returns it; the
    request's is in ``request_limits().decision``): allowed or the refusing layer, each
    layer's remaining count, and the wait until it would pass."""

    allowed: bool
    states: tuple[LayerState, ...]
    refused: LayerState | None = None
    # Seconds until this request would pass; None when it never can (cost over a limit).
    wait: float | None = 0.0
    policy_header: str = ""
    unavailable: bool = False     # the store was away and a fail_closed layer refused
    cause: str = ""               # why the store could not decide (its error, for the log)
    degraded: bool = False        # decided without the shared store (failed open, or local)
    # Shadow layers that would have refused this request had they enforced (it passed them).
    would_refuse: tuple[LayerState, ...] = ()
    # Allowed into a future slot (max_wait_seconds): seconds to sleep before running.
    delay: float = 0.0

    @property
    def retry_after(self) -> int:
        """Whole seconds for Retry-After: rounded up, so a client that waits this long passes."""
        if self.wait is None:
            return 0
        return max(1, math.ceil(self.wait))

    def charged(self, layer: Layer) -> bool:
        """Did the call charge ``layer`` (not a shadow layer that would have refused)?"""
        return not any(s.layer is layer for s in self.would_refuse)

    @property
    def tightest(self) -> LayerState | None:
        if self.refused is not None:
            return self.refused
        if not self.states:
            return None
        return min(self.states, key=lambda s: (s.remaining, -s.reset))


def from_reply(compiled: CompiledPlan, reply: AcquireReply) -> Decision:
    """The decision for ``compiled``'s layers from what the script answered."""
    # An edge refusal ends the script early: only the layers it reached report.
    states = tuple(LayerState(layer, remaining, reset / 1e6)
                   for layer, (remaining, reset) in zip(compiled.layers, reply.states,
                                                        strict=False))
    header = compiled.policy_header
    would: tuple[LayerState, ...] = ()
    if compiled.calendar:
        header = policy_header(compiled.layers, reply.now_us)
    if compiled.shadow:
        states, would = shadowed(states)
    if reply.allowed:
        return Decision(True, states, policy_header=header, would_refuse=would,
                        delay=reply.delay_us / 1e6)
    wait = None if reply.wait_us < 0 else reply.wait_us / 1e6
    return Decision(False, states, states[reply.refused - 1], wait, header, would_refuse=would)


def shadow_over(layers: tuple[Layer, ...], states: list[tuple[int, int]]
                ) -> tuple[LayerState, ...]:
    """The shadow layers among ``layers`` (a model's guard) that would have refused, from the
    script's (remaining, reset_us) for them."""
    return tuple(LayerState(layer, remaining, reset / 1e6)
                 for layer, (remaining, reset) in zip(layers, states, strict=False)
                 if remaining < 0)


def shadowed(states: tuple[LayerState, ...]
             ) -> tuple[tuple[LayerState, ...], tuple[LayerState, ...]]:
    """(states as headers show them, the shadow layers that would have refused).

    The script marks a shadow layer that would have refused with a remaining below 0 (what
    it would hold had it counted the request); headers show 0."""
    would = tuple(s for s in states if s.remaining < 0)
    if not would:
        return states, ()
    return tuple(LayerState(s.layer, max(0, s.remaining), s.reset) for s in states), would


def store_away(compiled: CompiledPlan, cause: Exception | str = "") -> Decision:
    """The failure policy's answer when the store cannot decide; ``cause`` (the store's
    error) goes in the fail-policy log line, so an operator sees which failure it was."""
    if compiled.fail_closed:
        return Decision(False, (), wait=1.0, unavailable=True, cause=str(cause))
    return Decision(True, (), degraded=True, cause=str(cause))


class Refused(Exception):
    """The user's layers refused (or, with the store away, a fail_closed one would not guess);
    nothing was charged. The web layer maps it to its 429, 400 or 503."""

    def __init__(self, decision: Decision) -> None:
        super().__init__("refused by the user's layers")
        self.decision = decision


class GuardRefused(Exception):
    """The model's upstream guard refused after the user's layers passed; the user's charge
    was given back. ``wait``: seconds until it would pass; None when the request alone is more
    than the guard ever lets through. ``decision``: the user's layers, as they passed."""

    def __init__(self, model: str, wait: float | None, decision: Decision) -> None:
        super().__init__(f"refused by the upstream guard of {model!r}")
        self.model = model
        self.wait = wait
        self.decision = decision

    @property
    def retry_after(self) -> int | None:
        """Whole seconds for Retry-After, rounded up; None when no wait helps."""
        return None if self.wait is None else max(1, math.ceil(self.wait))


def joined(first: Decision, second: Decision) -> Decision:
    """One decision for two subjects' layers decided for one request, in one call or in
    calls made apart (a user's, then their org's or a route's): refused if either refused,
    by the first refusal; headers list both; the longer wait for a slot."""
    by = first if not first.allowed else second
    refused = not by.allowed
    return Decision(
        not refused, first.states + second.states,
        by.refused if refused else None, by.wait if refused else 0.0,
        ", ".join(h for h in (first.policy_header, second.policy_header) if h),
        unavailable=by.unavailable if refused else False,
        cause=first.cause or second.cause,
        degraded=first.degraded or second.degraded,
        would_refuse=first.would_refuse + second.would_refuse,
        delay=max(first.delay, second.delay))
