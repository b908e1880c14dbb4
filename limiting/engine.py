"""One request's layers → one script call → one Decision, or one complete Reservation (its
LLM units, an org's layers, a route's limits and the model's guard included)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from .composed import Charged, Outcome
from .core.ask import Ask
from .core.codec import AcquireCall, AcquireReply, Costs
from .core.decision import (
    Decision,
    GuardRefused,
    Refused,
    from_reply,
    joined,
    shadow_over,
    store_away,
)
from .core.groups import Group, ordered
from .core.layers import CompiledPlan, Layer, compile_plan
from .core.naming import KEY_USER, EdgeKeys, user_prefix
from .core.orgs import compile_org
from .core.policy import Plan, Policy
from .guard import Guard, guard_wait, us
from .ledger import LedgerKeys, Spender
from .reservation import Charge, Reservation, new_lease_id
from .stores.store import Store, StoreUnavailable


class Engine(Guard):
    """Decides for a user, and for the caller's IP when the edge rides in the same call.

    ``edge`` holds the edge layers and their keys' builder when the store is one server, so
    the per-IP fixed window costs no extra round trip; otherwise Flask-Limiter checks it alone.
    """

    def __init__(self, store: Store, policy: Policy, namespace: str = "rl:",
                 edge: tuple[Layer, ...] = (), edge_keys: EdgeKeys | None = None) -> None:
        super().__init__(store, policy, namespace, edge, edge_keys)
        # On one server the model's guard keys can join the user's call, as the edge does.
        self.guard_in_call = store.single_node
        self.ledger_keys = LedgerKeys(namespace)
        # While the shared store is away: the same layers in this process, limits shared out.
        self.fallback: Engine | None = None

    def acquire(self, user: str, ip: str | None = None, plan: Plan | None = None,
                realm: str = KEY_USER, org: Plan | None = None) -> Decision:
        """Check and, only if every user layer (and every layer of ``org``) passes, charge
        one request to ``user`` (and to ``org``). Never waits: :meth:`acquire_with` does."""
        plan = plan or self.policy.resolve(user)
        if org is not None:   # the org's layers as a group of their own, in the same call
            return self.acquire_with(user, ip, plan, realm, (), org).decision
        compiled = self.compiled(plan)
        try:
            reply = self._call(self._keys(compiled, user, ip, realm), compiled.args)
        except StoreUnavailable:
            if self.fallback is not None:
                fb, fb_plan, _ = self._in_fallback(user, plan)
                decision = fb.acquire(user, None, fb_plan, realm)
                decision.degraded = True
                return decision
            return store_away(compiled)
        return from_reply(compiled, reply)

    def acquire_with(self, user: str, ip: str | None, plan: Plan, realm: str,
                     extra: Sequence[Group], org: Plan | None = None,
                     max_wait: float = 0.0) -> Outcome:
        """:meth:`acquire` with more groups (a route's limits) decided with the plan's (and
        ``org``'s, as a group of its own). ``max_wait``: seconds the request may wait for a
        future slot (the decision's delay); what ``outcome.charged`` took gives it back."""
        compiled = self.compiled(plan)
        groups = [self.plan_group(compiled, user, ip, realm), *extra]
        if org is not None:
            groups.append(self.org_group(org, realm))
        outcome = self.decide(groups, us(max_wait))
        if outcome.away and self.fallback is not None:
            # The local fallback knows plans (and orgs) only; the route limits' store is away.
            fb, fb_plan, fb_org = self._in_fallback(user, plan, org)
            outcome.decision = fb.acquire(user, None, fb_plan, realm, fb_org)
            outcome.decision.degraded = True
        return outcome

    def reserve(self, user: str, plan: Plan, ask: Ask, *, ip: str | None = None,
                realm: str = KEY_USER, guard: bool = True, renews: bool = True,
                org: Plan | None = None, extra: Sequence[Group] = (),
                charged: list[Charged] | None = None, max_wait: float = 0.0) -> Reservation:
        """Charge one request to ``user`` and reserve its LLM units, then pass the model's
        guard (``guard=False``: skip it, as the local fallback does). ``renews=False``: an
        answer made in this process, whose lease needs no keep-alive.

        ``extra``: more groups (a route's limits) decided in the user's call on one server,
        else first in calls of their own, given back if the user or guard refuses; what they
        charged is appended to ``charged``.

        ``max_wait``: seconds the request may wait for a future slot of the user's layers
        and the guard's (the decision's delay; refund_everything gives the slot back).

        Returns the complete reservation. Raises Refused (the user's, ``org``'s or a route's
        layers: nothing was charged) or GuardRefused (the model's guard: the charges were
        given back).
        """
        if extra and not self.store.single_node:
            return self._reserve_apart(user, plan, ask, ip, realm, guard, renews, extra,
                                       charged, org, max_wait)
        compiled = self._compiled_llm(plan)
        spender = Spender(self.ledger_keys, user, realm, plan.name, ask.model_name, ask.key_id,
                          self.policy.history_days)
        leases = plan.max_concurrent or (org is not None and org.max_concurrent)
        costs = ask.costs(new_lease_id() if leases else None)
        own = AcquireCall.priced(self._keys(compiled, user, ip, realm), compiled.args,
                                 compiled.per_call, costs)
        plan_size = own.size
        if extra:
            # One server: the route's groups join the user's call, after the plan's layers.
            for group in extra:
                own = own.join(group.call)
            compiled = replace(self.combined(compiled.layers + ordered([extra])),
                               plan=compiled.plan, edge_count=compiled.edge_count)
        org_part = self._org_call(org, realm, costs) if org is not None else None
        shard, other = self._shards(ask.model_name)
        guard_call = self._guard_call(ask.model_name, costs, plan.name, shard) if guard else None
        base = own
        if org_part is not None and self.guard_in_call:
            base = base.join(org_part[1])   # one server: the org's layers in the same call
        head = base.size
        call = base
        if guard_call is not None and self.guard_in_call:
            # One server: the model's guard joins the user's all-or-nothing call.
            call = base.join(guard_call[1])
        guard_joined = call.size > head
        try:
            reply = self._call(call.keys, call.args, us(max_wait))
            if guard_joined:
                def joined_call(guard: AcquireCall) -> AcquireReply:
                    whole = base.join(guard)
                    return self._call(whole.keys, whole.args, us(max_wait))

                # That shard is full and nothing was charged: the whole call again, with
                # another shard's guard.
                retried = self._other_shard(ask.model_name, costs, plan.name, other, reply,
                                            lambda r: r.refused_after(head), joined_call)
                if retried is not None:
                    guard_call, again = retried
                    assert again is not None
                    reply = again
        except StoreUnavailable:
            return self._reserve_away(user, plan, ask, compiled, realm, renews, spender,
                                      org)
        org_reply, undo = None, False
        if org_part is None:
            decision = from_reply(compiled, reply.first(own.size) if guard_joined else reply)
        else:
            decision, org_reply, undo = self._org_decision(compiled, own, reply, org_part,
                                                           head > own.size)
        if guard_joined and reply.refused_after(head):  # the rest passed; none charged
            raise GuardRefused(ask.model_name, guard_wait(reply.wait_us), decision)
        skip = compiled.edge_count
        charges = [c for c in _charges(compiled.layers[skip:plan_size],
                                       own.keys[skip:plan_size], costs)
                   if decision.charged(c.layer)]   # not a shadow layer that would refuse
        if not decision.allowed:
            if undo:   # the org refused in a call of its own: give the user's charge back
                Reservation(self.store, decision, ask, reply.charged_at, charges,
                            costs.lease).refund_everything()
            raise Refused(decision)
        at = plan_size
        for group in extra:
            states = reply.states[at:at + group.call.size]
            at += group.call.size
            charges += [Charge(layer, key, amount)
                        for layer, key, amount in group.refunds(states)]
            if charged is not None:
                charged.append((group, reply.charged_at, states))
        more: list[tuple[int, list[Charge]]] = []
        if org_part is not None:
            org_charges = [c for c in _charges(org_part[0].layers, org_part[1].keys, costs)
                           if decision.charged(c.layer)]
            if head > own.size:
                charges += org_charges   # charged by the same call: settled with the user's
            elif org_reply is not None:
                more.append((org_reply.now_us, org_charges))
        guard_at, guard_charges = 0, []
        if guard_call is not None:
            layers, apart = guard_call
            guard_at = reply.charged_at
            guard_states = reply.states[head:] if guard_joined else []
            if not guard_joined:
                # A Cluster puts the guard in a slot of its own: a call of its own, after.
                guard_reply = self._guard_apart(apart, max_wait)
                # That shard is full: one other shard before refusing.
                retried = self._other_shard(ask.model_name, costs, plan.name, other,
                                            guard_reply, lambda r: not r.allowed,
                                            lambda guard: self._guard_apart(guard, max_wait))
                if retried is not None:
                    (layers, apart), guard_reply = retried
                if guard_reply is not None and not guard_reply.allowed:
                    Reservation(self.store, decision, ask, reply.charged_at, charges,
                                costs.lease, more=more).refund_everything()
                    raise GuardRefused(ask.model_name, guard_wait(guard_reply.wait_us),
                                       decision)
                guard_at = guard_reply.charged_at if guard_reply is not None else 0
                if guard_reply is not None:   # it waits for the later of the two slots
                    decision.delay = max(decision.delay, guard_reply.delay_us / 1e6)
                guard_states = guard_reply.states if guard_reply is not None else []
            # Its shadow windows that would have refused charged nothing: logged, not settled.
            over = shadow_over(layers, guard_states)
            decision.would_refuse += over
            uncharged = [state.layer for state in over]
            if guard_at:   # what the guard's windows charged, for the settle to correct
                guard_charges = [c for c in _charges(layers, apart.keys, costs)
                                 if c.layer.kind in ("w", "W") and c.layer not in uncharged]
        return Reservation(self.store, decision, ask, reply.charged_at, charges, costs.lease,
                           guard_at, guard_charges, renews=renews, spender=spender, more=more)

    def _reserve_apart(self, user: str, plan: Plan, ask: Ask, ip: str | None, realm: str,
                       guard: bool, renews: bool, extra: Sequence[Group],
                       charged: list[Charged] | None, org: Plan | None,
                       max_wait: float = 0.0) -> Reservation:
        """A Cluster: ``extra`` decided first in calls of their own slots, then the user's
        reservation; a refusal there gives ``extra``'s charge back."""
        first = self.decide(extra, us(max_wait))
        if not first.decision.allowed:
            raise Refused(first.decision)
        try:
            reservation = self.reserve(user, plan, ask, ip=ip, realm=realm, guard=guard,
                                       renews=renews, org=org, max_wait=max_wait)
        except Refused as refused:
            self.refund(first.charged)
            raise Refused(joined(refused.decision, first.decision)) from None
        except GuardRefused:
            self.refund(first.charged)
            raise
        reservation.decision = joined(reservation.decision, first.decision)   # the later slot
        if charged is not None:
            charged += first.charged
        return reservation

    def _reserve_away(self, user: str, plan: Plan, ask: Ask, compiled: CompiledPlan,
                      realm: str, renews: bool, spender: Spender,
                      org: Plan | None = None) -> Reservation:
        """The store is away: the local fallback (no guard: the provider still has its own
        limits), else the failure policy; failing open holds nothing to settle."""
        if self.fallback is not None:
            fb, fb_plan, fb_org = self._in_fallback(user, plan, org)
            return fb.reserve(user, fb_plan, ask, realm=realm, guard=False, renews=renews,
                              org=fb_org)
        decision = store_away(compiled)
        if org is not None:
            decision = joined(decision, store_away(compile_org(org, llm=True)))
        if not decision.allowed:
            raise Refused(decision)
        return Reservation(self.store, decision, ask, renews=renews, spender=spender)

    def _in_fallback(self, user: str, plan: Plan, org: Plan | None = None
                     ) -> tuple[Engine, Plan, Plan | None]:
        """The local fallback, with ``plan`` (the one given: a key's) and ``org`` as this
        worker's share of them."""
        fb = self.fallback
        assert fb is not None
        return (fb, fb.policy.resolve(user, plan.name),
                None if org is None else fb.policy.orgs.get(org.name))

    def charge_edge(self, ip: str) -> Decision | None:
        """Count a request that never reached acquire (bad input) at the edge, as any edge would."""
        if self._edge_only is None or self.edge_keys is None:
            return None
        try:
            reply = self._call(self.edge_keys(ip), self._edge_only.args)
        except StoreUnavailable:
            return None
        return from_reply(self._edge_only, reply)

    def peek(self, user: str, plan: Plan | None = None, realm: str = KEY_USER,
             org: Plan | None = None) -> Decision:
        """Every user layer's state for ``user`` (then ``org``'s), charging nothing."""
        compiled = compile_plan(plan or self.policy.resolve(user), cost=0, llm=True)
        reply = self._call(self._keys(compiled, user, None, realm), compiled.args)
        decision = from_reply(compiled, reply)
        return decision if org is None else joined(decision, self.peek_org(org, realm))

    def reset(self, user: str, layer: str | None = None, plan: Plan | None = None,
              realm: str = KEY_USER) -> int:
        """Forget ``user``'s usage (one layer by name, or all); returns keys removed."""
        prefix = user_prefix(self.namespace, user, realm)
        layers = compile_plan(plan or self.policy.resolve(user), llm=True).layers
        keys = [prefix + lay.suffix for lay in layers if layer in (None, lay.name)]
        return self.store.delete(keys) if keys else 0


def _charges(layers: Sequence[Layer], keys: Sequence[str], costs: Costs) -> list[Charge]:
    return [Charge(layer, key, costs.amount(layer.unit))
            for layer, key in zip(layers, keys, strict=True)]
