"""One request's layers → one script call → one Decision, or one complete Reservation."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from .core.ask import Ask
from .core.codec import AcquireCall, AcquireReply, Costs, SettleCall
from .core.decision import (
    Decision,
    GuardRefused,
    Refused,
    from_reply,
    shadow_over,
    store_away,
)
from .core.groups import Group, merged, ordered, plan_calls
from .core.groups import joined as join_groups
from .core.layers import CompiledPlan, Layer, compile_plan
from .core.naming import KEY_USER, EdgeKeys, user_prefix
from .core.policy import Plan, Policy
from .core.upstream import DEFAULT_MAX_HOLD, guard_layers, model_prefix, pacing_args
from .reservation import Charge, Reservation, new_lease_id
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


class Engine:
    """Decides for a user, and for the caller's IP when the edge rides in the same call.

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
        self._combined: dict[tuple[Layer, ...], CompiledPlan] = {}
        # On one server the model's guard keys can join the user's call, as the edge does.
        self.guard_in_call = store.single_node
        self._edge_only = compile_plan(None, edge) if edge else None
        # While the shared store is away: the same layers in this process, limits shared out.
        self.fallback: Engine | None = None

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

    def acquire(self, user: str, ip: str | None = None, plan: Plan | None = None,
                realm: str = KEY_USER) -> Decision:
        """Check and, only if every user layer passes, charge one request to ``user``."""
        compiled = self.compiled(plan or self.policy.resolve(user))
        try:
            reply = self._call(self._keys(compiled, user, ip, realm), compiled.args)
        except StoreUnavailable:
            if self.fallback is not None:
                # The plan it was given (a key's), as this worker's share of it.
                fb = self.fallback
                name = compiled.plan.name if compiled.plan is not None else None
                decision = fb.acquire(user, None, fb.policy.resolve(user, name), realm)
                decision.degraded = True
                return decision
            return store_away(compiled)
        return from_reply(compiled, reply)

    # --- requests composed of groups ------------------------------------------------------------

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

    def decide(self, groups: Sequence[Group]) -> Outcome:
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
                reply = self._call(call.keys, call.args)
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
                charged.append((group, reply.now_us, reply.states[at:at + size]))
                at += size
        return Outcome(from_reply(compiled, merged(replies)), charged)

    def acquire_with(self, user: str, ip: str | None, plan: Plan, realm: str,
                     extra: Sequence[Group]) -> Outcome:
        """:meth:`acquire` with more groups (a route's limits) decided with the plan's."""
        compiled = self.compiled(plan)
        outcome = self.decide([self.plan_group(compiled, user, ip, realm), *extra])
        if outcome.away and self.fallback is not None:
            # The local fallback knows plans only; the route limits' store is away.
            outcome.decision = self.acquire(user, ip, plan, realm)
        return outcome

    def refund(self, charged: Sequence[Charged]) -> None:
        """Give back what ``charged`` took (a later call refused; a deduct_when said no):
        one settle call per acquire call (the same clock, the same slot)."""
        calls: dict[tuple[int, str], SettleCall] = {}
        for group, at, states in charged:
            for layer, key, amount in group.refunds(states):
                tag = "" if self.store.single_node else group.tag
                call = calls.setdefault((at, tag), SettleCall(at))
                if layer.kind == "b":
                    call.add(key, "b", layer.limit, -amount)
                else:
                    call.add(key, layer.kind, layer.param, -amount)
        for call in calls.values():
            with contextlib.suppress(StoreUnavailable):   # then it ages out with its window
                self.store.run("settle", call.keys, call.args)

    def reserve(self, user: str, plan: Plan, ask: Ask, *, ip: str | None = None,
                realm: str = KEY_USER, guard: bool = True, renews: bool = True,
                extra: Sequence[Group] = (), charged: list[Charged] | None = None
                ) -> Reservation:
        """Charge one request to ``user`` and reserve its LLM units, then pass the model's
        guard (``guard=False``: skip it, as the local fallback does). ``renews=False``: an
        answer made in this process, whose lease needs no keep-alive.

        ``extra``: more groups (a route's limits) decided in the user's call on one server,
        else first in calls of their own, given back if the user or guard refuses; what they
        charged is appended to ``charged``.

        Returns the complete reservation. Raises Refused (the user's layers: nothing was
        charged) or GuardRefused (the model's guard: the user's charge was given back).
        """
        if extra and not self.store.single_node:
            return self._reserve_apart(user, plan, ask, ip, realm, guard, renews, extra,
                                       charged)
        compiled = self._compiled_llm(plan)
        costs = ask.costs(new_lease_id() if plan.max_concurrent else None)
        own = AcquireCall.priced(self._keys(compiled, user, ip, realm), compiled.args,
                                 compiled.per_call, costs)
        plan_size = own.size
        if extra:
            # One server: the route's groups join the user's call, after the plan's layers.
            own = join_groups([self.plan_group(compiled, user, ip, realm, own), *extra])
            compiled = replace(self.combined(compiled.layers + ordered([extra])),
                               plan=compiled.plan, edge_count=compiled.edge_count)
        guard_call = self._guard_call(ask.model_name, costs) if guard else None
        call = own
        if guard_call is not None and self.guard_in_call:
            # One server: the model's guard joins the user's all-or-nothing call.
            call = own.join(guard_call[1])
        joined = call is not own
        try:
            reply = self._call(call.keys, call.args)
        except StoreUnavailable:
            return self._reserve_away(user, plan, ask, compiled, realm, renews)
        decision = from_reply(compiled, reply.first(own.size) if joined else reply)
        if joined and reply.refused_after(own.size):  # the user's layers passed; none charged
            raise GuardRefused(ask.model_name, _guard_wait(reply.wait_us), decision)
        if not decision.allowed:
            raise Refused(decision)
        skip = compiled.edge_count
        charges = [c for c in _charges(compiled.layers[skip:plan_size],
                                       own.keys[skip:plan_size], costs)
                   if decision.charged(c.layer)]   # not a shadow layer that would refuse
        at = plan_size
        for group in extra:
            states = reply.states[at:at + group.call.size]
            at += group.call.size
            charges += [Charge(layer, key, amount)
                        for layer, key, amount in group.refunds(states)]
            if charged is not None:
                charged.append((group, reply.now_us, states))
        guard_at, guard_charges = 0, []
        if guard_call is not None:
            layers, apart = guard_call
            guard_at = reply.now_us
            guard_states = reply.states[own.size:] if joined else []
            if not joined:
                # A Cluster puts the guard in a slot of its own: a call of its own, after.
                try:
                    guard_reply = self._call(apart.keys, apart.args)
                except StoreUnavailable:   # the guard fails open: the provider has its limits
                    guard_reply = None
                if guard_reply is not None and not guard_reply.allowed:
                    Reservation(self.store, decision, ask, reply.now_us, charges,
                                costs.lease).refund_everything()
                    raise GuardRefused(ask.model_name, _guard_wait(guard_reply.wait_us),
                                       decision)
                guard_at = guard_reply.now_us if guard_reply is not None else 0
                guard_states = guard_reply.states if guard_reply is not None else []
            # Its shadow windows that would have refused charged nothing: logged, not settled.
            over = shadow_over(layers, guard_states)
            decision.would_refuse += over
            uncharged = [state.layer for state in over]
            if guard_at:   # what the guard's windows charged, for the settle to correct
                guard_charges = [c for c in _charges(layers, apart.keys, costs)
                                 if c.layer.kind in ("w", "W") and c.layer not in uncharged]
        return Reservation(self.store, decision, ask, reply.now_us, charges, costs.lease,
                           guard_at, guard_charges, renews=renews)

    def _reserve_apart(self, user: str, plan: Plan, ask: Ask, ip: str | None, realm: str,
                       guard: bool, renews: bool, extra: Sequence[Group],
                       charged: list[Charged] | None) -> Reservation:
        """A Cluster: ``extra`` decided first in calls of their own slots, then the user's
        reservation; a refusal there gives ``extra``'s charge back."""
        first = self.decide(extra)
        if not first.decision.allowed:
            raise Refused(first.decision)
        try:
            reservation = self.reserve(user, plan, ask, ip=ip, realm=realm, guard=guard,
                                       renews=renews)
        except Refused as refused:
            self.refund(first.charged)
            raise Refused(_joined(refused.decision, first.decision)) from None
        except GuardRefused:
            self.refund(first.charged)
            raise
        reservation.decision = _joined(reservation.decision, first.decision)
        if charged is not None:
            charged += first.charged
        return reservation

    def _reserve_away(self, user: str, plan: Plan, ask: Ask, compiled: CompiledPlan,
                      realm: str, renews: bool) -> Reservation:
        """The store is away: the local fallback (no guard: the provider still has its own
        limits), else the failure policy; failing open holds nothing to settle."""
        if self.fallback is not None:
            fb = self.fallback
            return fb.reserve(user, fb.policy.resolve(user, plan.name), ask, realm=realm,
                              guard=False, renews=renews)
        decision = store_away(compiled)
        if not decision.allowed:
            raise Refused(decision)
        return Reservation(self.store, decision, ask, renews=renews)

    def _guard_call(self, model_name: str, costs: Costs
                    ) -> tuple[tuple[Layer, ...], AcquireCall] | None:
        """The model's guard layers and their call for one request; None: it has none."""
        layers, prefix = self._guard_of(model_name)
        if not layers:
            return None
        return layers, AcquireCall.of([prefix + layer.suffix for layer in layers], layers, costs)

    def peek_model(self, model_name: str) -> Decision:
        """The model's guard layers (shared windows, learnt pacing), charging nothing."""
        layers, prefix = self._guard_of(model_name)
        if not layers:
            return Decision(True, ())
        compiled = compile_plan(None, layers, cost=0)
        reply = self._call([prefix + layer.suffix for layer in layers], compiled.args)
        return from_reply(compiled, reply)

    def max_hold(self, model_name: str) -> float:
        """The longest model-wide hold a provider's retry-after may write for this model."""
        model = self.policy.model(model_name)   # an alias holds as its model does
        return model.max_hold_seconds if model is not None else DEFAULT_MAX_HOLD

    def observe(self, model_name: str, headers: Mapping[str, str], status: int) -> None:
        """Learn the provider's pacing for ``model_name`` from one of its responses, now."""
        args = pacing_args(headers, status, self.max_hold(model_name))
        if args is not None:
            self.observe_args(model_name, args)

    def observe_args(self, model_name: str, args: list[int]) -> None:
        # Pacing is advice: a store that is away loses one observation, nothing more.
        with contextlib.suppress(StoreUnavailable):
            self.store.run("observe", [self._guard_of(model_name)[1] + "pace"], args)

    def _guard_of(self, model_name: str) -> tuple[tuple[Layer, ...], str]:
        """The guard's layers and key prefix: an alias shares its model's, as one upstream
        limit covers both names."""
        model = self.policy.model(model_name)
        name = model.name if model is not None else model_name
        return guard_layers(model_name, model), model_prefix(self.namespace, name)

    def charge_edge(self, ip: str) -> Decision | None:
        """Count a request that never reached acquire (bad input) at the edge, as any edge would."""
        if self._edge_only is None or self.edge_keys is None:
            return None
        try:
            reply = self._call(self.edge_keys(ip), self._edge_only.args)
        except StoreUnavailable:
            return None
        return from_reply(self._edge_only, reply)

    def peek(self, user: str, plan: Plan | None = None, realm: str = KEY_USER) -> Decision:
        """Every user layer's state for ``user``, charging nothing."""
        compiled = compile_plan(plan or self.policy.resolve(user), cost=0, llm=True)
        reply = self._call(self._keys(compiled, user, None, realm), compiled.args)
        return from_reply(compiled, reply)

    def _call(self, keys: list[str], args: Sequence[bytes]) -> AcquireReply:
        return AcquireReply.parse(self.store.acquire(keys, args))

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


def _joined(decision: Decision, more: Decision) -> Decision:
    """``decision`` with ``more``'s layers after its own (calls made apart, read as one)."""
    header = ", ".join(h for h in (decision.policy_header, more.policy_header) if h)
    return replace(decision, states=decision.states + more.states, policy_header=header,
                   would_refuse=decision.would_refuse + more.would_refuse)


def _guard_wait(wait_us: int) -> float | None:
    """The guard's wait in seconds; None when no wait ever makes the request pass."""
    return max(0.001, wait_us / 1e6) if wait_us >= 0 else None
