"""One executor for any request's plan (limiting/core/groups.py CallPlan).

One server: every group in one all-or-nothing script call. A Cluster: one call per hash slot
in the plan's order; a refusal gives back what the earlier calls charged (a round trip per
further slot, one more to give back; meanwhile others see the earlier charge). When the store
is away for a slot of its own, the guard fails open (the provider has its limits), an org's
or a tag's layers answer by their failure policy, any other leaves the request to the store's. The
model's guard, last: when its shard is full, once more on one other shard before refusing.

Fallback models (a plan's alternatives): on one server the same single call decides the asked
model or the first alternative that passes (acquire.lua's ALTERNATIVES); on a Cluster (and
memory://) each alternative's plan is run in turn after the asked one refused, each with its
own undo, so others may briefly see a charge that is then given back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from .core.alternatives import with_alternatives
from .core.codec import AcquireReply, SettleCall, given_back, with_deadline
from .core.decision import Decision, from_reply, joined, store_away
from .core.groups import FALLBACK_UNITS, Alternative, CallPlan, Group, Role, merged, ordered
from .core.groups import joined as join_groups
from .core.layers import CompiledPlan, Layer, compile_plan
from .stores.store import Store, StoreUnavailable

# What a call charged one group: the group, the store's clock at that call (which window slot
# it charged) and the group's (remaining, reset_us) per layer in that call's reply.
Charged = tuple[Group, int, list[tuple[int, int]]]


@dataclass(slots=True)
class Outcome:
    """The decision over every group of a request but the guard, and what was charged to each
    (empty when refused: a refusal charges nothing, compensation included). ``away``: the
    store was. ``guard_wait_us``: set when the model's guard refused (the rest passed and was
    given back), µs until it would pass (-1: never)."""

    decision: Decision
    charged: list[Charged] = field(default_factory=list)
    away: bool = False
    guard_wait_us: int | None = None
    served: Alternative | None = None   # the fallback model that served (None: the asked)

    @property
    def may_fall_back(self) -> bool:
        """Refused by the model's guard or a layer counting its tokens or dollars (not by
        one counting requests, whatever the model): a fallback model may still pass."""
        if self.away:
            return False
        if self.guard_wait_us is not None:   # the user's layers passed (and were given back)
            return True
        refused = self.decision.refused
        return refused is not None and refused.layer.unit in FALLBACK_UNITS

    @property
    def wait_us(self) -> int:
        """µs until the refused request would pass (-1: never)."""
        if self.guard_wait_us is not None:
            return self.guard_wait_us
        wait = self.decision.wait
        return -1 if wait is None else round(wait * 1e6)


def shorter(first: int, second: int) -> int:
    """The shorter of two shards' waits (-1: never on that shard)."""
    if first < 0 or second < 0:
        return max(first, second)
    return min(first, second)


class Executor:
    """Runs plans against one store, and gives back what a refused plan charged."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._views: dict[tuple[Layer, ...], CompiledPlan] = {}

    def call(self, groups: Sequence[Group], wait_us: int = 0) -> AcquireReply:
        """One acquire call over ``groups``; ``wait_us``: how long it may wait for a slot."""
        call = groups[0].call if len(groups) == 1 else join_groups(groups)
        return AcquireReply.parse(self.store.acquire(call.keys, with_deadline(call.args,
                                                                              wait_us)))

    def look(self, keys: list[str], args: Sequence[bytes], wait_us: int = 0) -> AcquireReply:
        """One acquire call as encoded (a peek's, at cost 0)."""
        return AcquireReply.parse(self.store.acquire(keys, with_deadline(args, wait_us)))

    def view(self, layers: tuple[Layer, ...]) -> CompiledPlan:
        """The decision's view of ``layers`` (headers, shadow, month), built once per set."""
        found = self._views.get(layers)
        if found is None:
            if len(self._views) > 4096:   # endpoints x plans: bounded, but never unbounded
                self._views.clear()
            found = self._views[layers] = compile_plan(None, layers)
        return found

    def run(self, plan: CallPlan) -> Outcome:
        """Check every group and charge them all only if all pass."""
        if plan.alternatives:
            return self._with_alternatives(plan)
        if self.store.single_node or (len(plan.groups) == 1 and plan.guard is None):
            return self._at_once(plan)
        return self._by_slot(plan)

    def _with_alternatives(self, plan: CallPlan) -> Outcome:
        """The asked model, else the first fallback that passes: in the same call on one
        server; else each alternative's plan in turn (each undoes its own charges)."""
        if self.store.single_node:
            return self._alternatives_at_once(plan)
        outcome = self._by_slot(plan)
        if not outcome.may_fall_back:
            return outcome
        soonest = outcome.wait_us
        for alt in plan.alternatives:
            tried = self._by_slot(CallPlan(alt.groups, plan.wait_us, alt.guard,
                                           alt.other_guard, plan.view))
            if tried.decision.allowed and not tried.away:
                tried.served = alt
                return tried
            if not tried.away:
                soonest = shorter(soonest, tried.wait_us)
        return _waiting(outcome, soonest)

    def _alternatives_at_once(self, plan: CallPlan) -> Outcome:
        view = plan.view or self.view(ordered([plan.groups]))
        head = sum(group.call.size for group in plan.groups)
        guards = [plan.guard, *(alt.guard for alt in plan.alternatives)]
        try:
            reply = self._call_alternatives(plan, guards)
            others = [plan.other_guard, *(alt.other_guard for alt in plan.alternatives)]
            if reply.refused_after(head) and any(others):
                # A guard's shard is full and nothing was charged: again, on the other shards.
                guards = [other or guard for other, guard in zip(others, guards, strict=True)]
                first, reply = reply, self._call_alternatives(plan, guards)
                if not reply.allowed:
                    reply.wait_us = shorter(first.wait_us, reply.wait_us)
        except StoreUnavailable as exc:
            return Outcome(store_away(view, exc), away=True)
        if not reply.allowed:
            if reply.refused_after(head):
                return Outcome(from_reply(view, reply.first(head)),
                               guard_wait_us=reply.wait_us)
            return Outcome(from_reply(view, reply))
        served = reply.served or 0
        alt = plan.alternatives[served - 1] if served else None
        groups = plan.groups if alt is None else alt.groups
        guard = guards[served]
        groups = [*groups, guard] if guard is not None else list(groups)
        return Outcome(from_reply(view, reply), _split(reply, groups), served=alt)

    def _call_alternatives(self, plan: CallPlan, guards: Sequence[Group | None]
                           ) -> AcquireReply:
        guard = guards[0]
        asked = join_groups(plan.groups if guard is None else [*plan.groups, guard])
        sent = with_alternatives(
            asked, plan.wait_us, 0 if guard is None else guard.call.size,
            [(join_groups(alt.groups), None if guard is None else guard.call)
             for alt, guard in zip(plan.alternatives, guards[1:], strict=True)])
        return AcquireReply.parse(self.store.acquire(sent.keys, sent.args))

    def _at_once(self, plan: CallPlan) -> Outcome:
        groups = plan.groups
        view = plan.view or self.view(ordered([groups]))
        try:
            if plan.guard is not None:   # the guard rides last in the same call
                head = sum(group.call.size for group in groups)
                groups = [*plan.groups, plan.guard]
                reply = self.call(groups, plan.wait_us)
                if reply.refused_after(head) and plan.other_guard is not None:
                    # That shard is full and nothing was charged: again, on the other shard.
                    groups = [*plan.groups, plan.other_guard]
                    first, reply = reply, self.call(groups, plan.wait_us)
                    if reply.refused_after(head):
                        reply.wait_us = shorter(first.wait_us, reply.wait_us)
                if reply.refused_after(head):
                    return Outcome(from_reply(view, reply.first(head)),
                                   guard_wait_us=reply.wait_us)
            else:
                reply = self.call(groups, plan.wait_us)
        except StoreUnavailable as exc:
            return Outcome(store_away(view, exc), away=True)
        decision = from_reply(view, reply)
        if not reply.allowed:
            return Outcome(decision)
        return Outcome(decision, _split(reply, groups))

    def _by_slot(self, plan: CallPlan) -> Outcome:
        replies: list[AcquireReply] = []
        charged: list[Charged] = []
        answered: list[Group] = []
        away: list[Layer] = []    # an org's or a tag's, when the store was away for its call
        cause = ""
        for call in plan.calls(one_server=False):
            try:
                reply = self.call(call, plan.wait_us)
            except StoreUnavailable as exc:
                if call[0].role not in (Role.ORG, Role.TAG):
                    self.refund(charged)
                    return Outcome(store_away(self.view(ordered([plan.groups])), exc), away=True)
                away += [layer for group in call for layer in group.layers]
                cause = str(exc)
                continue
            replies.append(reply)
            answered += call
            if not reply.allowed:
                self.refund(charged)
                charged = []
                break
            charged += _split(reply, call)
        decision = from_reply(self.view(ordered([answered])), merged(replies))
        if away:
            decision = joined(decision, store_away(self.view(tuple(away)), cause))
        if not decision.allowed:
            self.refund(charged)
            return Outcome(decision)
        return self._then_guard(plan, decision, charged)

    def _then_guard(self, plan: CallPlan, decision: Decision, charged: list[Charged]
                     ) -> Outcome:
        """The model's guard in a call of its own, after the rest passed (its slot is its
        own); the store away, it fails open (the provider has its limits)."""
        guard = plan.guard
        if guard is None:
            return Outcome(decision, charged)
        reply = self._try(guard, plan.wait_us)
        if reply is not None and not reply.allowed and plan.other_guard is not None:
            guard = plan.other_guard   # that shard is full: one other shard before refusing
            again = self._try(guard, plan.wait_us)
            if again is not None and not again.allowed:
                again.wait_us = shorter(reply.wait_us, again.wait_us)
            reply = again
        if reply is None:
            return Outcome(decision, charged)
        if not reply.allowed:
            self.refund(charged)
            return Outcome(decision, guard_wait_us=reply.wait_us)
        decision.delay = max(decision.delay, reply.delay_us / 1e6)   # the later of the slots
        return Outcome(decision, [*charged, (guard, reply.charged_at, reply.states)])

    def _try(self, group: Group, wait_us: int) -> AcquireReply | None:
        try:
            return self.call([group], wait_us)
        except StoreUnavailable:
            return None

    def refund(self, charged: Sequence[Charged]) -> None:
        """Give back what ``charged`` took (a later call refused; a deduct_when said no):
        one settle call per acquire call (the same clock, the same slot)."""
        calls: dict[tuple[int, str], SettleCall] = {}
        for group, at, states in charged:
            for layer, key, amount in group.refunds(states):
                tag = "" if self.store.single_node else group.tag
                calls.setdefault((at, tag), SettleCall(at)).add(
                    key, *given_back(layer, amount, group.lease))
        for call in calls.values():
            with contextlib.suppress(StoreUnavailable):   # then it ages out with its window
                self.store.run("settle", call.keys, call.args)


def _waiting(outcome: Outcome, wait_us: int) -> Outcome:
    """``outcome`` (refused) with ``wait_us`` as its wait: the soonest of the alternatives'."""
    if outcome.guard_wait_us is not None:
        outcome.guard_wait_us = wait_us
    else:
        outcome.decision.wait = None if wait_us < 0 else wait_us / 1e6
    return outcome


def _split(reply: AcquireReply, groups: Sequence[Group]) -> list[Charged]:
    """What one admitted call charged each of its groups."""
    if len(groups) == 1:
        return [(groups[0], reply.charged_at, reply.states)]
    out: list[Charged] = []
    at = 0
    for group in groups:
        size = group.call.size
        out.append((group, reply.charged_at, reply.states[at:at + size]))
        at += size
    return out
