"""A plan turned into the layers the acquire script checks, compiled once per plan."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

from .codec import Kind, num_arg, template_args
from .policy import FailMode, Plan
from .windows import MONTH, month_bounds


@dataclass(frozen=True, slots=True)
class Layer:
    name: str         # what a 429 body calls it: "user", "quota-day", ...
    kind: Kind        # how the scripts count it (limiting/core/codec.py)
    suffix: str       # key suffix after the user's prefix ("" for the edge: keyed by IP)
    limit: float      # bucket capacity or window limit
    param: float      # refill per second, or window length in microseconds
    window: int       # seconds, for RateLimit-Policy's w=
    fail: FailMode
    # What one unit of this layer is: "requests", "tokens", "input_tokens", "output_tokens",
    # "usd_micros", "leases" or "pace". A request's cost and its settle follow the unit.
    unit: str = "requests"
    # Decided, counted and reported, but never refuses (a plan's or model's mode = "shadow").
    shadow: bool = False
    # Others' requests reach it too (an org's, a route's scope or IP/header key): a waiter
    # may not put it in debt, so a bucket's code is Kind.SHARED_BUCKET's (acquire.lua).
    shared: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.kind, Kind):   # a kind given by its letter
            object.__setattr__(self, "kind", Kind(self.kind))

    @property
    def code(self) -> str:
        """The kind as the acquire script reads it (a shared bucket's, a shadow layer's)."""
        return self.kind.code(self.shared, self.shadow)


def bucket(name: str, suffix: str, capacity: float, per_second: float, fail: FailMode) -> Layer:
    return Layer(name, Kind.BUCKET, suffix, capacity, per_second,
                 max(1, math.ceil(capacity / per_second)), fail)


def edge(seconds: int, amount: int, fail: FailMode) -> Layer:
    return Layer("edge", Kind.EDGE, "", amount, seconds, seconds, fail)


def window(name: str, suffix: str, limit: float, seconds: int, fail: FailMode,
           unit: str = "requests") -> Layer:
    """A strict sliding window; anything but requests is counted in 8-byte slots."""
    return Layer(name, Kind.window_of(unit), suffix, limit, seconds * 1_000_000, seconds, fail,
                 unit)


def month(name: str, suffix: str, limit: float, fail: FailMode,
          unit: str = "requests") -> Layer:
    """A count per calendar month in UTC, from 00:00 on the 1st (the script finds the month
    from the store's clock; its w= in RateLimit-Policy is that month's length)."""
    return Layer(name, Kind.MONTH, suffix, limit, 1, MONTH, fail, unit)


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
    shadow: bool = False           # a layer may report "would refuse" (negative remaining)
    calendar: bool = False         # a month layer: RateLimit-Policy's w= depends on the date


def request_layers(plan: Plan) -> tuple[Layer, ...]:
    # burst 0: no bucket (an org may have only quotas; a plan always has one)
    layers = [bucket("user", "b", plan.burst, plan.refill_per_second, plan.fail_rate)
              ] if plan.burst else []
    layers += [month(q.name, "qmonth", q.amount, plan.fail_quota) if q.calendar
               else window(q.name, f"q{q.seconds}", q.amount, q.seconds, plan.fail_quota)
               for q in plan.quotas]
    return _moded(plan, layers)


def _moded(plan: Plan, layers: Iterable[Layer]) -> tuple[Layer, ...]:
    if plan.mode == "shadow":
        return tuple(replace(layer, shadow=True) for layer in layers)
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
    if plan.tokens_per_day:
        layers.append(window("tokens-day", "t86400", plan.tokens_per_day, 86400, fail, "tokens"))
    if plan.budget_usd_per_day:
        # Micro-dollars: whole numbers in the script, exact to a millionth of a dollar.
        layers.append(window("usd-day", "usd86400", round(plan.budget_usd_per_day * 1e6), 86400,
                             fail, "usd_micros"))
    if plan.budget_usd_per_month:
        layers.append(month("usd-month", "usdmonth", round(plan.budget_usd_per_month * 1e6),
                            fail, "usd_micros"))
    if plan.max_concurrent:
        ttl = plan.lease_ttl_seconds
        layers.append(Layer("concurrent", Kind.LEASE, "cc", plan.max_concurrent,
                            ttl * 1_000_000, ttl, fail, "leases"))
    return _moded(plan, layers)


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
        policy_header=policy_header(layers),
        fail_closed=any(layer.fail == "fail_closed" for layer in layers),
        per_call=tuple((i, layer.unit) for i, layer in enumerate(layers)
                       if layer.unit == "leases" or layer.unit in ESTIMATED_UNITS),
        shadow=any(layer.shadow for layer in layers),
        calendar=any(layer.kind.calendar for layer in layers),
    )


def policy_header(layers: Iterable[Layer], now_us: int | None = None) -> str:
    """RateLimit-Policy for ``layers``; a month layer's w= is the length of the month that
    holds ``now_us`` (the store's clock at the call), else the longest a month can be."""
    month_s = MONTH
    if now_us is not None:
        _, start, end = month_bounds(now_us)
        month_s = (end - start) // 1_000_000
    return ", ".join(f'"{layer.name}";q={num_arg(layer.limit)};'
                     f'w={month_s if layer.kind.calendar else layer.window}' for layer in layers)
