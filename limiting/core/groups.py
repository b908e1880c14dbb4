"""A request's plan: its groups of layers in order (limiting/executor.py runs any plan).

The edge (per IP), each route limit, the user's plan, an org's layers, each of an API key's
tags' layers, the model's guard: each is a Group, some layers and their keys under one hash
tag (one Cluster slot). To add a subject to every request, build its Group and put it in the
plan: headers, 429s and refunds follow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from .codec import AcquireCall, AcquireReply, layer_args
from .layers import CompiledPlan, Layer


class Role(Enum):
    """What a group is to its request (on a Cluster, how its call answers the store away)."""

    EDGE = "edge"
    ROUTE = "route"
    PLAN = "plan"
    ORG = "org"
    END_USER = "end_user"   # a plan's end_user layers, for one end user of one key holder
    TAG = "tag"
    GUARD = "guard"


@dataclass(slots=True)   # not frozen: built on every request, and frozen __init__ is slower
class Group:
    """Layers of one subject and their keys, which share the hash ``tag`` (one Cluster slot).

    ``costs``: what the call charges each layer (for a refund, or a reservation's settle);
    ``kept``: how many leading layers are never given back (the edge's fixed windows count
    every attempt); ``lease``: the lease id a concurrency layer holds."""

    layers: tuple[Layer, ...]
    call: AcquireCall
    tag: str
    costs: tuple[float, ...]
    kept: int = 0
    role: Role = Role.ROUTE
    lease: str | None = None

    @classmethod
    def of(cls, layers: Sequence[Layer], keys: list[str], costs: Sequence[float], tag: str,
           kept: int = 0) -> Group:
        """Each layer charged its cost (0: only looks)."""
        args: list[bytes] = []
        for layer, cost in zip(layers, costs, strict=True):
            args += layer_args(layer.code, layer.limit, layer.param, str(int(cost)))
        return cls(tuple(layers), AcquireCall(keys, args), tag, tuple(costs), kept)

    def charges(self, states: Sequence[tuple[int, int]]) -> list[tuple[Layer, str, float]]:
        """(layer, key, amount) this group's call charged, given its layers' states in the
        reply: not the kept ones, nor a shadow layer that would have refused (its remaining
        below 0: it counted nothing)."""
        return [(layer, key, cost)
                for i, (layer, key, cost) in enumerate(zip(self.layers, self.call.keys,
                                                           self.costs, strict=True))
                if i >= self.kept and not (layer.shadow and i < len(states) and states[i][0] < 0)]

    def refunds(self, states: Sequence[tuple[int, int]]) -> list[tuple[Layer, str, float]]:
        """What an undo gives back of :meth:`charges`: nothing charged at 0, nor what no
        undo returns (Kind.undoable)."""
        return [c for c in self.charges(states) if c[2] and c[0].kind.undoable]


# Units a fallback model may be served for: a limit counting them depends on the model's
# estimate and prices. A limit counting requests or leases refuses whatever the model.
FALLBACK_UNITS = frozenset({"tokens", "input_tokens", "output_tokens", "usd_micros"})


@dataclass(slots=True)
class Alternative:
    """A fallback model's version of a reservation's plan: the same groups, keys and layers
    charged at its prices, and its own guard (on a shard; ``other_guard`` on one other)."""

    model: str
    groups: list[Group]
    guard: Group | None
    other_guard: Group | None = None


@dataclass(slots=True)
class CallPlan:
    """A request's groups in the order they are charged and the decision reports them, how
    long it may wait for a future slot, and the model's guard (charged last, reported apart).

    ``other_guard``: the same guard on one other shard, tried once when the first is full.
    ``view``: the decision's view of the groups' layers, when the planner has it compiled
    (one group: the hot path); else the executor builds it once per set of layers.
    ``alternatives``: the model's fallbacks, in order, tried when its guard or a layer
    counting its tokens or dollars refuses (see limiting/executor.py)."""

    groups: list[Group]
    wait_us: int = 0
    guard: Group | None = None
    other_guard: Group | None = None
    view: CompiledPlan | None = None
    alternatives: tuple[Alternative, ...] = ()

    def calls(self, one_server: bool) -> list[list[Group]]:
        """The calls to make, in order: one on a single server; else one per hash tag, in
        the order each tag first appears (the first group's subject is asked first)."""
        if one_server or len(self.groups) <= 1:
            return [self.groups]
        calls: dict[str, list[Group]] = {}
        for group in self.groups:
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
