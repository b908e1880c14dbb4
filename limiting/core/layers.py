"""A plan turned into the layers the acquire script checks, compiled once per plan."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .codec import num_arg, template_args
from .policy import FailMode, Plan


@dataclass(frozen=True, slots=True)
class Layer:
    name: str         # what a 429 body calls it: "user", "quota-day", ...
    kind: str         # "f" edge fixed window, "b" token bucket, "w"/"W" sliding window
    suffix: str       # key suffix after the user's prefix ("" for the edge: keyed by IP)
    limit: float      # bucket capacity or window limit
    param: float      # refill per second, or window length in microseconds
    window: int       # seconds, for RateLimit-Policy's w=
    fail: FailMode
    # What one unit of this layer is: "requests", "tokens", "input_tokens", "output_tokens",
    # "usd_micros", "leases" or "pace". A request's cost and its settle follow the unit.
    unit: str = "requests"


def bucket(name: str, suffix: str, capacity: float, per_second: float, fail: FailMode) -> Layer:
    return Layer(name, "b", suffix, capacity, per_second, max(1, math.ceil(capacity / per_second)),
                 fail)


def edge(seconds: int, amount: int, fail: FailMode) -> Layer:
    return Layer("edge", "f", "", amount, seconds, seconds, fail)


def window(name: str, suffix: str, limit: float, seconds: int, fail: FailMode,
           unit: str = "requests") -> Layer:
    """A strict sliding window; anything but requests is counted in 8-byte slots ("W")."""
    kind = "w" if unit == "requests" else "W"
    return Layer(name, kind, suffix, limit, seconds * 1_000_000, seconds, fail, unit)


# Units whose charge is a per-request estimate that the settle corrects; request counts stay.
ESTIMATED_UNITS = frozenset({"tokens", "input_tokens", "output_tokens", "usd_micros"})


@dataclass(frozen=True, slots=True)
class CompiledPlan:
    """The static part of every request's script call for one plan."""

    plan: Plan | None
    layers: tuple[Layer, ...]      # edge layers first, then the user's
    edge_count: int
    suffixes: tuple[str, ...]      # of the user's layers
    args: tuple[bytes, ...]        # kind, a, b, cost per layer, encoded once
    policy_header: str             # RateLimit-Policy never changes for a plan
    fail_closed: bool              # does any layer refuse while the store is away?
    # (index, unit) of the LLM layers and leases, whose cost each request sets
    per_call: tuple[tuple[int, str], ...] = ()


def request_layers(plan: Plan) -> tuple[Layer, ...]:
    layers = [bucket("user", "b", plan.burst, plan.refill_per_second, plan.fail_rate)]
    layers += [window(q.name, f"q{q.seconds}", q.amount, q.seconds, plan.fail_quota)
               for q in plan.quotas]
    return tuple(layers)


def llm_layers(plan: Plan) -> tuple[Layer, ...]:
    """Token, dollar and concurrency layers: charged per request by its reservation."""
    fail = plan.fail_quota
    layers = []
    for name, suffix, limit, unit in (
            ("tokens-minute", "t60", plan.tokens_per_minute, "tokens"),
            ("input-tokens-minute", "ti60", plan.input_tokens_per_minute, "input_tokens"),
            ("output-tokens-minute", "to60", plan.output_tokens_per_minute, "output_tokens")):
        if limit:
            layers.append(window(name, suffix, limit, 60, fail, unit))
    if plan.budget_usd_per_day:
        # Micro-dollars: whole numbers in the script, exact to a millionth of a dollar.
        layers.append(window("usd-day", "usd86400", round(plan.budget_usd_per_day * 1e6), 86400,
                             fail, "usd_micros"))
    if plan.max_concurrent:
        ttl = plan.lease_ttl_seconds
        layers.append(Layer("concurrent", "c", "cc", plan.max_concurrent, ttl * 1_000_000, ttl,
                            fail, "leases"))
    return tuple(layers)


def compile_plan(plan: Plan | None, edges: tuple[Layer, ...] = (), cost: int = 1,
                 llm: bool = False) -> CompiledPlan:
    """The script arguments for ``edges`` then ``plan``'s layers (no plan: the edge alone).

    ``cost`` 1 charges one request; 0 only reads every layer's state. With ``llm`` the
    plan's token, dollar and concurrency layers follow, their costs set per request.
    """
    own = request_layers(plan) if plan is not None else ()
    if llm and plan is not None:
        own += llm_layers(plan)
    layers = edges + own
    return CompiledPlan(
        plan=plan,
        layers=layers,
        edge_count=len(edges),
        suffixes=tuple(layer.suffix for layer in own),
        args=template_args(layers, cost),
        policy_header=", ".join(f'"{layer.name}";q={num_arg(layer.limit)};w={layer.window}'
                                for layer in layers),
        fail_closed=any(layer.fail == "fail_closed" for layer in layers),
        per_call=tuple((i, layer.unit) for i, layer in enumerate(layers)
                       if layer.unit == "leases" or layer.unit in ESTIMATED_UNITS),
    )
