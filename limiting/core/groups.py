"""A request's acquire call, composed of groups: some layers and their keys, one subject each.

The edge (per IP), each route limit, the user's plan, an org's layers, the model's guard: each
is a Group. On one server every group joins one all-or-nothing call (AcquireCall.join). On a
Cluster a call may only touch one hash slot, so groups are sent in calls by their hash tag, in
order; when a later call refuses, what the earlier ones charged is given back (compensation).
This module plans the calls and reads their replies as one; limiting/engine.py runs them.

To add a subject to every request's call (orgs, say), build its Group (layers, keys under one
hash tag, its costs) and pass it with the others: headers, 429s and refunds follow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .codec import AcquireCall, AcquireReply, layer_args
from .layers import Layer


@dataclass(frozen=True, slots=True)
class Group:
    """Layers of one subject and their keys, which share the hash ``tag`` (one Cluster slot).

    ``costs``: what the call charges each layer (for a refund); ``kept``: how many leading
    layers are never given back (the edge's fixed windows count every attempt)."""

    layers: tuple[Layer, ...]
    call: AcquireCall
    tag: str
    costs: tuple[float, ...]
    kept: int = 0

    @classmethod
    def of(cls, layers: Sequence[Layer], keys: list[str], costs: Sequence[float], tag: str,
           kept: int = 0) -> Group:
        """Each layer charged its cost (0: only looks)."""
        args: list[bytes] = []
        for layer, cost in zip(layers, costs, strict=True):
            args += layer_args(layer.code, layer.limit, layer.param, str(int(cost)))
        return cls(tuple(layers), AcquireCall(keys, args), tag, tuple(costs), kept)

    def refunds(self, states: Sequence[tuple[int, int]]) -> list[tuple[Layer, str, float]]:
        """(layer, key, amount) this group charged, given its layers' states in the reply: not
        the kept ones, nothing charged at 0, nor a shadow layer that would have refused."""
        return [(layer, key, cost)
                for i, (layer, key, cost) in enumerate(zip(self.layers, self.call.keys,
                                                           self.costs, strict=True))
                if i >= self.kept and cost and layer.kind != "f"
                and not (layer.shadow and i < len(states) and states[i][0] < 0)]


def plan_calls(groups: Sequence[Group], one_server: bool) -> list[list[Group]]:
    """The calls to make, in order: one on a single server; else one per hash tag, in the
    order each tag first appears (the first group's subject is asked first)."""
    if one_server or len(groups) <= 1:
        return [list(groups)]
    calls: dict[str, list[Group]] = {}
    for group in groups:
        calls.setdefault(group.tag, []).append(group)
    return list(calls.values())


def joined(groups: Sequence[Group]) -> AcquireCall:
    call = groups[0].call
    for group in groups[1:]:
        call = call.join(group.call)
    return call


def merged(replies: Sequence[AcquireReply]) -> AcquireReply:
    """The replies of calls made one after another, read as one call's: states in call order,
    refused at the refusing layer's overall position (the last reply is the one that refused,
    if any did); the clock of the first call."""
    if len(replies) == 1:
        return replies[0]
    states: list[tuple[int, int]] = []
    for reply in replies[:-1]:
        states += reply.states
    last = replies[-1]
    refused = len(states) + last.refused if not last.allowed else 0
    # Admitted, each call may have put the request in a later slot: it waits for the last.
    wait = last.wait_us if not last.allowed else max(r.delay_us for r in replies)
    return AcquireReply(last.allowed, refused, wait, replies[0].now_us,
                        states + last.states)


def ordered(calls: Sequence[Sequence[Group]]) -> tuple[Layer, ...]:
    """Every layer in the order the calls check them (a merged reply's state order)."""
    return tuple(layer for call in calls for group in call for layer in group.layers)
