"""The model's upstream guard: its windows (per plan, with reserve shares; over N shards) and
the pacing learnt from the provider's headers, shared by every user of the model.

Engine (limiting/engine.py) joins the guard to a user's call on one server, or calls it apart
on a Cluster; this is how it finds the guard's layers, keys and shards, and how it learns.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Mapping
from dataclasses import replace

from .composed import Calls
from .core.capacity import pace_share
from .core.codec import AcquireCall, AcquireReply, Costs
from .core.decision import Decision, from_reply
from .core.layers import Layer, compile_plan
from .core.upstream import DEFAULT_MAX_HOLD, guard_layers, model_prefix, pacing_args
from .stores.store import StoreUnavailable

# The guard's layers for one request, and their call.
GuardCall = tuple[tuple[Layer, ...], AcquireCall]


class Guard(Calls):
    """Calls, and the model's guard."""

    def _guard_call(self, model_name: str, costs: Costs, plan: str | None = None,
                    shard: int = 0) -> GuardCall | None:
        """The model's guard layers and their call for one request of ``plan`` on ``shard``;
        None: it has none."""
        layers, prefix = self._guard_of(model_name, plan, shard)
        if not layers:
            return None
        return layers, AcquireCall.of([prefix + layer.suffix for layer in layers], layers, costs)

    def _other_shard(self, model_name: str, costs: Costs, plan: str, other: int | None,
                     first: AcquireReply | None, refused: Callable[[AcquireReply], bool],
                     send: Callable[[AcquireCall], AcquireReply | None]
                     ) -> tuple[GuardCall, AcquireReply | None] | None:
        """When the request's shard of the guard ``refused`` it in ``first`` (nothing was
        charged), the same request once more on ``other``: (its guard call, ``send``'s reply,
        telling the shorter of the two waits if that shard refuses too). None: one shard, or
        no refusal. ``send`` makes the call (the user's with the guard joined, or the
        guard's alone)."""
        if other is None or first is None or not refused(first):
            return None
        guard_call = self._guard_call(model_name, costs, plan, other)
        assert guard_call is not None
        reply = send(guard_call[1])
        if reply is not None and refused(reply):
            reply.wait_us = shorter(first.wait_us, reply.wait_us)
        return guard_call, reply

    def _guard_apart(self, call: AcquireCall, max_wait: float = 0) -> AcquireReply | None:
        """The guard in a call of its own (waiting up to ``max_wait`` seconds for its slot);
        None: the store is away, and the guard fails open (the provider has its limits)."""
        try:
            return self._call(call.keys, call.args, us(max_wait))
        except StoreUnavailable:
            return None

    def _shards(self, model_name: str) -> tuple[int, int | None]:
        """The guard's shard for one request, and the one other it tries before refusing
        (None: one shard). Random, not by user: one busy user must not fill one shard."""
        model = self.policy.model(model_name)
        shards = model.shards if model is not None else 1
        if shards == 1:
            return 0, None
        first = random.randrange(shards)
        return first, (first + random.randrange(1, shards)) % shards

    def _shard_count(self, model_name: str) -> int:
        model = self.policy.model(model_name)
        return model.shards if model is not None else 1

    def _shard_prefixes(self, model_name: str) -> list[str]:
        """Every shard's key prefix of the model's guard (no layers built for it)."""
        return [self._prefix(model_name, i) for i in range(self._shard_count(model_name))]

    def peek_model(self, model_name: str) -> Decision:
        """The model's guard layers (shared windows, learnt pacing), charging nothing; a
        sharded guard's remaining summed over its shards."""
        layers, _ = self._guard_of(model_name)
        if not layers:
            return Decision(True, ())
        model = self.policy.model(model_name)
        # Reported as one guard: its whole limits, every shard's remaining added up.
        whole = guard_layers(model_name, model if model is None else replace(model, shards=1))
        states: list[tuple[int, int]] = []
        reply = None
        for i in range(self._shard_count(model_name)):
            shard_layers, prefix = self._guard_of(model_name, None, i)
            compiled = compile_plan(None, shard_layers, cost=0)
            reply = self._call([prefix + layer.suffix for layer in shard_layers], compiled.args)
            states = reply.states if not states else [
                (a + b, max(r, s)) for (a, r), (b, s) in zip(states, reply.states, strict=True)]
        assert reply is not None
        reply.states = states
        return from_reply(compile_plan(None, whole, cost=0), reply)

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
        # A sharded guard: each shard gets its part of what the provider says is left.
        prefixes = self._shard_prefixes(model_name)
        for i, prefix in enumerate(prefixes):
            with contextlib.suppress(StoreUnavailable):
                self.store.run("observe", [prefix + "pace"], pace_share(args, len(prefixes), i))

    def _guard_of(self, model_name: str, plan: str | None = None,
                  shard: int = 0) -> tuple[tuple[Layer, ...], str]:
        """The guard's layers (as ``plan`` may fill them) and key prefix on ``shard``: an
        alias shares its model's, as one upstream limit covers both names."""
        return (guard_layers(model_name, self.policy.model(model_name), plan, shard),
                self._prefix(model_name, shard))

    def _prefix(self, model_name: str, shard: int) -> str:
        """The guard's key prefix on ``shard``: an alias shares its model's."""
        model = self.policy.model(model_name)
        if model is None:
            return model_prefix(self.namespace, model_name, None)
        return model_prefix(self.namespace, model.name, shard if model.shards > 1 else None)


def shorter(first: int, second: int) -> int:
    """The shorter of two shards' waits (-1: never on that shard)."""
    if first < 0 or second < 0:
        return max(first, second)
    return min(first, second)


def us(seconds: float) -> int:
    return round(seconds * 1e6) if seconds > 0 else 0


def guard_wait(wait_us: int) -> float | None:
    """The guard's wait in seconds; None when no wait ever makes the request pass."""
    return max(0.001, wait_us / 1e6) if wait_us >= 0 else None
