"""One request's layers → one script call → one Decision."""

from __future__ import annotations

from .decision import Decision, from_reply, store_away
from .identity import user_prefix
from .layers import CompiledPlan, Layer, compile_plan, edge
from .policy import FailMode, Plan, Policy
from .store import Store, StoreUnavailable


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
        self._edge_only = compile_plan(None, edge) if edge else None

    def compiled(self, plan: Plan) -> CompiledPlan:
        cached = self._compiled.get(plan.name)
        if cached is None or cached.plan is not plan:
            cached = self._compiled[plan.name] = compile_plan(plan, self.edge)
        return cached

    def _keys(self, compiled: CompiledPlan, user: str, ip: str | None) -> list[str]:
        prefix = user_prefix(self.namespace, user)
        keys = [prefix + suffix for suffix in compiled.suffixes]
        if compiled.edge_count:
            assert self.edge_keys is not None
            return self.edge_keys(ip or "unknown") + keys
        return keys

    def acquire(self, user: str, ip: str | None = None, plan: Plan | None = None) -> Decision:
        """Check and, only if every user layer passes, charge one request to ``user``."""
        compiled = self.compiled(plan or self.policy.plan_for(user))
        try:
            reply = self.store.acquire(self._keys(compiled, user, ip), compiled.args)
        except StoreUnavailable:
            return store_away(compiled)
        return from_reply(compiled, reply)

    def charge_edge(self, ip: str) -> Decision | None:
        """Count a request that never reached acquire (bad input) at the edge, as any edge would."""
        if self._edge_only is None or self.edge_keys is None:
            return None
        try:
            reply = self.store.acquire(self.edge_keys(ip), self._edge_only.args)
        except StoreUnavailable:
            return None
        return from_reply(self._edge_only, reply)

    def peek(self, user: str) -> Decision:
        """Every user layer's state for ``user``, charging nothing."""
        compiled = compile_plan(self.policy.plan_for(user), cost=0)
        reply = self.store.acquire(self._keys(compiled, user, None), compiled.args)
        return from_reply(compiled, reply)

    def reset(self, user: str, layer: str | None = None) -> int:
        """Forget ``user``'s usage (one layer by name, or all); returns keys removed."""
        prefix = user_prefix(self.namespace, user)
        layers = compile_plan(self.policy.plan_for(user)).layers
        keys = [prefix + lay.suffix for lay in layers if layer in (None, lay.name)]
        return self.store.delete(keys) if keys else 0


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
