"""The calls a decision is made of: a plan's compiled layers and their keys, and a request
composed of groups (the edge, a route's limits, the user's plan, an org) decided together.

One server: one all-or-nothing call. A Cluster: one call per hash tag, in order, and what the
earlier calls charged is given back when a later one refuses (limiting/core/groups.py plans
the calls). :class:`limiting.engine.Engine` builds on this with reservations and the model's
guard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from .core.codec import (
    AcquireCall,
    AcquireReply,
    Costs,
    SettleCall,
    given_back,
    with_deadline,
)
from .core.decision import Decision, from_reply, joined, store_away
from .core.groups import Group, merged, ordered, plan_calls
from .core.groups import joined as join_groups
from .core.layers import CompiledPlan, Layer, compile_plan
from .core.naming import KEY_USER, EdgeKeys, org_prefix, user_prefix
from .core.orgs import compile_org
from .core.policy import Plan, Policy
from .stores.store import Store, StoreUnavailable

# What a call charged one group: the group, the store's clock at that call (which window slot
# it charged) and the group's (remaining, reset_us) per layer in that call's reply.
Charged = tuple[Group, int, list[tuple[int, int]]]


@dataclass(slots=True)
class Outcome:
    """The decision over every group of a request, and what was charged to each (empty when
    refused: a refusal charges nothing, compensation included). ``away``: the store was."""

    decision: Decision
    charged: list[Charged] = field(default_factory=list)
    away: bool = False


class Calls:
    """A store and a policy, and the calls decisions are made of (compiled once per plan).

    ``edge`` holds the edge layers and their keys' builder when the store is one server, so
    the per-IP fixed window costs no extra round trip; otherwise Flask-Limiter checks it alone.
    """

    def __init__(self, store: Store, policy: Policy, namespace: str = "rl:",
                 edge: tuple[Layer, ...] = (), edge_keys: EdgeKeys | None = None) -> None:
        self.store = store
        self.policy = policy
        self.namespace = namespace
        self.edge = edge
        self.edge_keys = edge_keys
        self._compiled: dict[str, CompiledPlan] = {}
        self._llm: dict[str, CompiledPlan] = {}
        self._orgs: dict[tuple[str, bool], CompiledPlan] = {}
        self._combined: dict[tuple[Layer, ...], CompiledPlan] = {}
        self._edge_only = compile_plan(None, edge) if edge else None

    def compiled(self, plan: Plan) -> CompiledPlan:
        cached = self._compiled.get(plan.name)
        if cached is None or cached.plan is not plan:
            cached = self._compiled[plan.name] = compile_plan(plan, self.edge)
        return cached

    def _compiled_llm(self, plan: Plan) -> CompiledPlan:
        cached = self._llm.get(plan.name)
        if cached is None or cached.plan is not plan:
            cached = self._llm[plan.name] = compile_plan(plan, self.edge, llm=True)
        return cached

    def _keys(self, compiled: CompiledPlan, user: str, ip: str | None,
              realm: str = KEY_USER) -> list[str]:
        prefix = user_prefix(self.namespace, user, realm)
        keys = [prefix + suffix for suffix in compiled.suffixes]
        if compiled.edge_count:
            assert self.edge_keys is not None
            return self.edge_keys(ip or "unknown") + keys
        return keys

    def _call(self, keys: list[str], args: Sequence[bytes], wait_us: int = 0) -> AcquireReply:
        """One acquire call; ``wait_us``: how long the request may wait for a future slot."""
        return AcquireReply.parse(self.store.acquire(keys, with_deadline(args, wait_us)))

    def _org_call(self, org: Plan, realm: str, costs: Costs | None
                  ) -> tuple[CompiledPlan, AcquireCall]:
        """``org``'s layers and their call for one request: its request layers, and with
        ``costs`` (a reservation's) its tokens, dollars and requests in flight too."""
        key = (org.name, costs is not None)
        compiled = self._orgs.get(key)
        if compiled is None or compiled.plan is not org:
            compiled = self._orgs[key] = replace(compile_org(org, llm=costs is not None),
                                                 plan=org)
        prefix = org_prefix(self.namespace, org.name, realm)
        keys = [prefix + layer.suffix for layer in compiled.layers]
        if costs is None:
            return compiled, AcquireCall(keys, compiled.args)
        return compiled, AcquireCall.priced(keys, compiled.args, compiled.per_call, costs)

    def _org_decision(self, compiled: CompiledPlan, own: AcquireCall, reply: AcquireReply,
                      org_part: tuple[CompiledPlan, AcquireCall], in_call: bool
                      ) -> tuple[Decision, AcquireReply | None, bool]:
        """(the user's and the org's decision as one, the org's own reply when its call was
        apart, must the user's charge be given back). ``in_call``: the org's layers rode in
        ``reply``; otherwise (a Cluster) its call runs now, only if the user's passed."""
        org_compiled, org_call = org_part
        decision = from_reply(compiled, reply.first(own.size))
        if in_call:
            return joined(decision, from_reply(org_compiled, reply.part(
                own.size, org_call.size))), None, False
        if not decision.allowed:
            return decision, None, False
        try:
            org_reply: AcquireReply | None = self._call(org_call.keys, org_call.args)
        except StoreUnavailable:   # the org's layers by their failure policy
            org_reply = None
        org_decision = (store_away(org_compiled) if org_reply is None
                        else from_reply(org_compiled, org_reply))
        both = joined(decision, org_decision)
        return both, org_reply, not both.allowed


    def plan_group(self, compiled: CompiledPlan, user: str, ip: str | None,
                   realm: str = KEY_USER, call: AcquireCall | None = None) -> Group:
        """``compiled``'s layers for ``user`` (the edge's first, never given back) as a Group;
        ``call``: already priced (a reservation's tokens and lease)."""
        if call is None:
            call = AcquireCall(self._keys(compiled, user, ip, realm), compiled.args)
        return Group(compiled.layers, call, user_prefix(self.namespace, user, realm),
                     (1,) * len(compiled.layers), compiled.edge_count)

    def edge_group(self, ip: str) -> Group | None:
        """The edge's layers for ``ip`` when they ride in the store call (one server)."""
        if self._edge_only is None or self.edge_keys is None:
            return None
        return Group(self.edge, AcquireCall(self.edge_keys(ip), self._edge_only.args), "",
                     (1,) * len(self.edge), len(self.edge))

    def combined(self, layers: tuple[Layer, ...]) -> CompiledPlan:
        """The decision's view of ``layers`` (headers, shadow, month), built once per set."""
        found = self._combined.get(layers)
        if found is None:
            if len(self._combined) > 4096:   # endpoints x plans: bounded, but never unbounded
                self._combined.clear()
            found = self._combined[layers] = compile_plan(None, layers)
        return found

    def decide(self, groups: Sequence[Group], wait_us: int = 0) -> Outcome:
        """Check every group and charge them all only if all pass.

        One server: one call. A Cluster: one call per hash tag, in order; a refusal gives
        back what the earlier calls charged, so the request still charges nothing (the cost
        is a round trip per further slot, and one more to give back on a refusal; between
        the calls the earlier charge is visible to others, which may be refused by it)."""
        calls = plan_calls(groups, self.store.single_node)
        compiled = self.combined(ordered(calls))
        replies: list[AcquireReply] = []
        charged: list[Charged] = []
        for call_groups in calls:
            call = join_groups(call_groups)
            try:
                reply = self._call(call.keys, call.args, wait_us)
            except StoreUnavailable:
                self.refund(charged)
                return Outcome(store_away(compiled), away=True)
            replies.append(reply)
            if not reply.allowed:
                self.refund(charged)
                charged = []
                break
            at = 0
            for group in call_groups:
                size = group.call.size
                charged.append((group, reply.charged_at, reply.states[at:at + size]))
                at += size
        return Outcome(from_reply(compiled, merged(replies)), charged)

    def refund(self, charged: Sequence[Charged]) -> None:
        """Give back what ``charged`` took (a later call refused; a deduct_when said no):
        one settle call per acquire call (the same clock, the same slot)."""
        calls: dict[tuple[int, str], SettleCall] = {}
        for group, at, states in charged:
            for layer, key, amount in group.refunds(states):
                tag = "" if self.store.single_node else group.tag
                calls.setdefault((at, tag), SettleCall(at)).add(key, *given_back(layer, amount))
        for call in calls.values():
            with contextlib.suppress(StoreUnavailable):   # then it ages out with its window
                self.store.run("settle", call.keys, call.args)

    def peek_org(self, org: Plan, realm: str = KEY_USER) -> Decision:
        """Every layer of ``org`` (its key holders', or with BODY_USER its /chat user_ids'),
        charging nothing."""
        compiled = compile_org(org, llm=True, cost=0)
        prefix = org_prefix(self.namespace, org.name, realm)
        return from_reply(compiled, self._call([prefix + lay.suffix for lay in compiled.layers],
                                               compiled.args))

    def reset_org(self, org: Plan, layer: str | None = None, realm: str = KEY_USER) -> int:
        """Forget ``org``'s usage (one layer, by its name with or without "org:<name>/")."""
        prefix = org_prefix(self.namespace, org.name, realm)
        keys = [prefix + lay.suffix for lay in compile_org(org, llm=True).layers
                if layer in (None, lay.name, lay.name.partition("/")[2])]
        return self.store.delete(keys) if keys else 0


    def org_group(self, org: Plan, realm: str) -> Group:
        """``org``'s request layers as a Group of their own (its own hash tag)."""
        compiled, call = self._org_call(org, realm, None)
        return Group(compiled.layers, call, org_prefix(self.namespace, org.name, realm),
                     (1,) * len(compiled.layers))
