"""One request's user-side layers → one script call → one Decision."""

from __future__ import annotations

from .decision import Decision, from_reply, store_away
from .identity import user_prefix
from .layers import CompiledPlan, compile_plan
from .policy import Plan, Policy
from .store import Store, StoreUnavailable


class Engine:
    def __init__(self, store: Store, policy: Policy, namespace: str = "rl:") -> None:
        self.store = store
        self.policy = policy
        self.namespace = namespace
        self._compiled: dict[str, CompiledPlan] = {}

    def compiled(self, plan: Plan) -> CompiledPlan:
        cached = self._compiled.get(plan.name)
        if cached is None or cached.plan is not plan:
            cached = self._compiled[plan.name] = compile_plan(plan)
        return cached

    def acquire(self, user: str, plan: Plan | None = None) -> Decision:
        """Check and, only if every layer passes, charge one request to ``user``."""
        compiled = self.compiled(plan or self.policy.plan_for(user))
        prefix = user_prefix(self.namespace, user)
        keys = [prefix + suffix for suffix in compiled.suffixes]
        try:
            reply = self.store.acquire(keys, compiled.args)
        except StoreUnavailable:
            return store_away(compiled)
        return from_reply(compiled, reply)

    def peek(self, user: str) -> Decision:
        """Every layer's state for ``user``, charging nothing."""
        compiled = compile_plan(self.policy.plan_for(user), cost=0)
        prefix = user_prefix(self.namespace, user)
        reply = self.store.acquire([prefix + s for s in compiled.suffixes], compiled.args)
        return from_reply(compiled, reply)

    def reset(self, user: str, layer: str | None = None) -> int:
        """Forget ``user``'s usage (one layer by name, or all); returns keys removed."""
        compiled = self.compiled(self.policy.plan_for(user))
        prefix = user_prefix(self.namespace, user)
        keys = [prefix + lay.suffix for lay in compiled.layers if layer in (None, lay.name)]
        return self.store.delete(keys) if keys else 0
