"""One request's layers → one script call → one Decision."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

from .core.codec import AcquireReply, encode_layers, with_costs
from .core.decision import Decision, LayerState, from_reply, shadow_over, store_away
from .core.layers import CompiledPlan, Layer, compile_plan, edge
from .core.naming import KEY_USER, user_prefix
from .core.policy import FailMode, ModelPolicy, Plan, Policy
from .core.pricing import STANDARD, PriceTerms, reserve_usd_micros
from .core.upstream import DEFAULT_MAX_HOLD, guard_layers, model_prefix, pacing_args
from .reservation import Charge, Reservation, new_lease_id
from .stores.store import Store, StoreUnavailable


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
        compiled = self.compiled(plan or self.policy.plan_for(user))
        try:
            reply = self._call(self._keys(compiled, user, ip, realm), compiled.args)
        except StoreUnavailable:
            if self.fallback is not None:
                # The plan it was given (a key's), as this worker's share of it.
                fb = self.fallback
                name = compiled.plan.name if compiled.plan is not None else None
                decision = fb.acquire(user, None, fb.policy.plan_named(name, user),
                                     realm)
                decision.degraded = True
                return decision
            return store_away(compiled)
        return from_reply(compiled, reply)

    def reserve(self, user: str, ip: str | None, plan: Plan, model_name: str,
                model: ModelPolicy | None, input_tokens: int, max_output_tokens: int,
                guard: bool, realm: str = KEY_USER, *,
                terms: PriceTerms = STANDARD
                ) -> tuple[Decision, Reservation | None, float | None]:
        """Charge one request and reserve its LLM units, then pass the model's guard.

        Returns the user's decision, the reservation if everything passed, and the guard's
        wait in seconds if the guard refused (the user's charge is then given back; a wait
        below 0: the request alone is more than the model's guard ever lets through).
        """
        cached = self._llm.get(plan.name)
        if cached is None or cached.plan is not plan:
            cached = self._llm[plan.name] = compile_plan(plan, self.edge, llm=True)
        usd = round(reserve_usd_micros(model, input_tokens, max_output_tokens, terms))
        costs = {"tokens": input_tokens + max_output_tokens, "input_tokens": input_tokens,
                 "output_tokens": max_output_tokens, "usd_micros": usd}
        lease = new_lease_id() if plan.max_concurrent else None
        per_call: dict[int, str] = {}      # only the layers whose cost is per request
        for i in cached.per_call:
            unit = cached.layers[i].unit
            per_call[i] = (lease or "") if unit == "leases" else str(costs[unit])
        args = with_costs(cached.args, per_call)
        keys = self._keys(cached, user, ip, realm)
        guard_part = self._guard_args(model_name, input_tokens + max_output_tokens) \
            if guard and self.guard_in_call else None
        try:
            if guard_part is None:
                reply = self._call(keys, args)
            else:
                # One server: the model's guard joins the same all-or-nothing call.
                reply = self._call(keys + guard_part[1], args + guard_part[2])
        except StoreUnavailable:
            if self.fallback is not None:
                fb = self.fallback
                return fb.reserve(user, None, fb.policy.plans[plan.name], model_name, model,
                                  input_tokens, max_output_tokens, guard=False, terms=terms,
                                  realm=realm)
            decision = store_away(cached)
            # Failing open holds nothing: the reservation has nothing to settle.
            empty = Reservation(self.store, decision, 0, [], None, model, input_tokens,
                                max_output_tokens, terms=terms) if decision.allowed else None
            return decision, empty, None
        guard_wait: float | None = None
        if guard_part is not None and reply.refused_after(len(cached.layers)):
            guard_wait = _guard_wait(reply.wait_us)   # the user's layers passed; none charged
        decision = from_reply(cached, reply.first(len(cached.layers)))
        if guard_wait is not None:
            return decision, None, guard_wait
        if not decision.allowed:
            return decision, None, None
        own = cached.layers[cached.edge_count:]
        charges = [Charge(layer, key, costs.get(layer.unit, 1))
                   for layer, key in zip(own, keys[cached.edge_count:], strict=True)
                   if decision.charged(layer)]
        reservation = Reservation(self.store, decision, reply.now_us, charges, lease, model,
                                  input_tokens, max_output_tokens, terms=terms)
        if guard_part is not None:
            layers, guard_keys, _, guard_costs = guard_part
            over = shadow_over(layers, reply.states[len(cached.layers):])
            _hold_guard(reservation, reply.now_us, layers, guard_keys, guard_costs, over)
        elif guard:
            wait = self._guard(reservation, model_name, input_tokens + max_output_tokens)
            if wait is not None:
                reservation.refund_everything()
                return decision, None, wait
        return decision, reservation, None

    def _guard_args(self, model_name: str, tokens: int
                    ) -> tuple[tuple[Layer, ...], list[str], list[bytes], dict[str, int]]:
        """The model's guard layers, their keys, script arguments and costs for one call."""
        layers, prefix = self._guard_of(model_name)
        keys = [prefix + layer.suffix for layer in layers]
        costs = {"requests": 1, "tokens": tokens, "pace": tokens}
        args = encode_layers((layer.code, layer.limit, layer.param, str(costs[layer.unit]))
                             for layer in layers)
        return layers, keys, list(args), costs

    def _guard(self, reservation: Reservation, model_name: str, tokens: int) -> float | None:
        """The model's shared windows and learnt pacing, in a call of their own (a Cluster
        puts them in another slot); None when the upstream call may go ahead."""
        layers, keys, args, costs = self._guard_args(model_name, tokens)
        try:
            reply = self._call(keys, args)
        except StoreUnavailable:
            return None  # the guard fails open: the provider still has its own limits
        if not reply.allowed:
            return _guard_wait(reply.wait_us)
        _hold_guard(reservation, reply.now_us, layers, keys, costs,
                    shadow_over(layers, reply.states))
        return None

    def peek_model(self, model_name: str) -> Decision:
        """The model's guard layers (shared windows, learnt pacing), charging nothing."""
        layers, prefix = self._guard_of(model_name)
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
        return guard_layers(model), model_prefix(self.namespace, name)

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
        compiled = compile_plan(plan or self.policy.plan_for(user), cost=0, llm=True)
        reply = self._call(self._keys(compiled, user, None, realm), compiled.args)
        return from_reply(compiled, reply)

    def _call(self, keys: list[str], args: Sequence[bytes]) -> AcquireReply:
        return AcquireReply.parse(self.store.acquire(keys, args))

    def reset(self, user: str, layer: str | None = None, plan: Plan | None = None,
              realm: str = KEY_USER) -> int:
        """Forget ``user``'s usage (one layer by name, or all); returns keys removed."""
        prefix = user_prefix(self.namespace, user, realm)
        layers = compile_plan(plan or self.policy.plan_for(user), llm=True).layers
        keys = [prefix + lay.suffix for lay in layers if layer in (None, lay.name)]
        return self.store.delete(keys) if keys else 0


def _guard_wait(wait_us: int) -> float:
    """The guard's wait in seconds; -1.0 when no wait ever makes the request pass."""
    return max(0.001, wait_us / 1e6) if wait_us >= 0 else -1.0


def _hold_guard(reservation: Reservation, charged_at: int, layers: tuple[Layer, ...],
                keys: list[str], costs: dict[str, int], over: tuple[LayerState, ...] = ()
                ) -> None:
    """Record what the guard's windows charged, so the settle can correct the tokens;
    ``over``: its shadow layers that would have refused (charged nothing), for the logs."""
    reservation.guard_at = charged_at
    reservation.decision.would_refuse += over
    uncharged = [s.layer for s in over]
    reservation.guard_charges = [Charge(layer, key, costs[layer.unit])
                                 for layer, key in zip(layers, keys, strict=True)
                                 if layer.kind in ("w", "W") and layer not in uncharged]


class EdgeKeys:
    """Flask-Limiter's own keys for the per-IP application limits, so both count as one."""

    def __init__(self, texts: tuple[str, ...], prefix: str = "edge") -> None:
        from limits import parse

        self._items = [parse(text) for text in texts]
        # key_for() joins its parts on every call; only the IP in the middle ever changes.
        self._parts: list[tuple[str, str]] = []
        for item in self._items:
            head, tail = item.key_for(prefix, "\x00", "global").split("\x00")
            self._parts.append(("LIMITS:" + head, tail))

    def layers(self, fail: FailMode) -> tuple[Layer, ...]:
        return tuple(edge(item.get_expiry(), item.amount, fail) for item in self._items)

    def __call__(self, ip: str) -> list[str]:
        return [head + ip + tail for head, tail in self._parts]
