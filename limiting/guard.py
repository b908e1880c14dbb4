"""The model's upstream guard: its windows (per plan, with reserve shares; over N shards) and
the pacing learnt from the provider's headers, shared by every user of the model.

:class:`GuardKeys` finds the guard's layers, keys and shards (the planner puts its Group last
in a reservation's plan); :class:`ModelGuard` reads it and teaches it the provider's pacing.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping
from dataclasses import replace

from .core.capacity import pace_share
from .core.codec import AcquireCall, Costs
from .core.decision import Decision, from_reply
from .core.groups import Group, Role
from .core.layers import Layer, compile_plan
from .core.policy import Policy
from .core.upstream import DEFAULT_MAX_HOLD, guard_layers, model_prefix, pacing_args
from .executor import Executor
from .stores.store import StoreUnavailable

# A guard's layers, key prefix, keys, encoded arguments and units, built once.
_Built = tuple[tuple[Layer, ...], str, list[str], tuple[bytes, ...], tuple[str, ...]]


class GuardKeys:
    """Where a model's guard lives: its layers as a plan may fill them, per shard."""

    def __init__(self, policy: Policy, namespace: str) -> None:
        self.policy = policy
        self.namespace = namespace
        # (model, plan, shard) -> the guard's layers, prefix, keys and encoded arguments
        self._built: dict[tuple[str, str | None, int], _Built] = {}

    def group(self, model_name: str, costs: Costs, plan: str | None = None,
              shard: int = 0) -> Group | None:
        """The model's guard layers on ``shard`` as one request of ``plan`` charges them;
        None: it has none."""
        built = self._built.get((model_name, plan, shard))
        if built is None:
            if len(self._built) > 4096:   # models x plans (overrides too): bounded
                self._built.clear()
            built = self._built[model_name, plan, shard] = self._build(model_name, plan, shard)
        layers, prefix, keys, template, units = built
        if not layers:
            return None
        # Each layer charged this request's cost in its unit (pacing meters tokens).
        priced = tuple(enumerate(units))
        return Group(layers, AcquireCall.priced(keys, template, priced, costs), prefix,
                     tuple(costs.amount(unit) for unit in units), role=Role.GUARD)

    def _build(self, model_name: str, plan: str | None, shard: int) -> _Built:
        layers, prefix = self.layers(model_name, plan, shard)
        return (layers, prefix, [prefix + layer.suffix for layer in layers],
                compile_plan(None, layers).args, tuple(layer.unit for layer in layers))

    def layers(self, model_name: str, plan: str | None = None,
               shard: int = 0) -> tuple[tuple[Layer, ...], str]:
        """The guard's layers (as ``plan`` may fill them) and key prefix on ``shard``: an
        alias shares its model's, as one upstream limit covers both names."""
        return (guard_layers(model_name, self.policy.model(model_name), plan, shard),
                self.prefix(model_name, shard))

    def prefix(self, model_name: str, shard: int) -> str:
        """The guard's key prefix on ``shard``: an alias shares its model's."""
        model = self.policy.model(model_name)
        if model is None:
            return model_prefix(self.namespace, model_name, None)
        return model_prefix(self.namespace, model.name, shard if model.shards > 1 else None)

    def count(self, model_name: str) -> int:
        model = self.policy.model(model_name)
        return model.shards if model is not None else 1

    def shards(self, model_name: str) -> tuple[int, int | None]:
        """The guard's shard for one request, and the one other it tries before refusing
        (None: one shard). Random, not by user: one busy user must not fill one shard."""
        shards = self.count(model_name)
        if shards == 1:
            return 0, None
        first = random.randrange(shards)
        return first, (first + random.randrange(1, shards)) % shards


class ModelGuard:
    """Reads a model's guard, and teaches it the pacing its provider's headers say."""

    def __init__(self, executor: Executor, keys: GuardKeys) -> None:
        self.executor = executor
        self.keys = keys

    def peek(self, model_name: str) -> Decision:
        """The model's guard layers (shared windows, learnt pacing), charging nothing; a
        sharded guard's remaining summed over its shards."""
        layers, _ = self.keys.layers(model_name)
        if not layers:
            return Decision(True, ())
        model = self.keys.policy.model(model_name)
        # Reported as one guard: its whole limits, every shard's remaining added up.
        whole = guard_layers(model_name, model if model is None else replace(model, shards=1))
        states: list[tuple[int, int]] = []
        reply = None
        for i in range(self.keys.count(model_name)):
            shard_layers, prefix = self.keys.layers(model_name, None, i)
            keys = [prefix + layer.suffix for layer in shard_layers]
            reply = self.executor.look(keys, compile_plan(None, shard_layers, cost=0).args)
            states = reply.states if not states else [
                (a + b, max(r, s)) for (a, r), (b, s) in zip(states, reply.states, strict=True)]
        assert reply is not None
        reply.states = states
        return from_reply(compile_plan(None, whole, cost=0), reply)

    def max_hold(self, model_name: str) -> float:
        """The longest model-wide hold a provider's retry-after may write for this model."""
        model = self.keys.policy.model(model_name)   # an alias holds as its model does
        return model.max_hold_seconds if model is not None else DEFAULT_MAX_HOLD

    def observe(self, model_name: str, headers: Mapping[str, str], status: int) -> None:
        """Learn the provider's pacing for ``model_name`` from one of its responses, now."""
        args = pacing_args(headers, status, self.max_hold(model_name))
        if args is not None:
            self.observe_args(model_name, args)

    def observe_args(self, model_name: str, args: list[int]) -> None:
        # Pacing is advice: a store that is away loses one observation, nothing more.
        # A sharded guard: each shard gets its part of what the provider says is left.
        shards = self.keys.count(model_name)
        for i in range(shards):
            with contextlib.suppress(StoreUnavailable):
                self.executor.store.run("observe", [self.keys.prefix(model_name, i) + "pace"],
                                        pace_share(args, shards, i))


def us(seconds: float) -> int:
    return round(seconds * 1e6) if seconds > 0 else 0


def guard_wait(wait_us: int) -> float | None:
    """The guard's wait in seconds; None when no wait ever makes the request pass."""
    return max(0.001, wait_us / 1e6) if wait_us >= 0 else None
