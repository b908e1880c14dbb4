"""A model's guard capacity: shares of it kept for the plans that paid (``reserve``), and its
windows spread over ``shards`` slots so that no one key carries a whole fleet's traffic.

Both only change the ``a`` (limit) each window layer is checked with, and which key it is
checked in: every plan's usage still counts in the same window of its shard.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

from .codec import PACE_COUNTS
from .policy_reader import TableReader

# Past this, more shards strand more capacity (up to shards - 1 units) than they gain:
# a Cluster rarely has more masters.
MAX_SHARDS = 256


def read_reserve(r: TableReader, plans: Collection[str]) -> dict[str, float]:
    """``reserve = { pro = 0.2 }``: each share a number in (0, 1) for a plan under [plans];
    together below 1, or nobody else could ever use the model."""
    table = r.get("reserve", dict, {})
    for plan, share in table.items():
        if plan not in plans:
            r.fail(f"reserve.{plan}", f"names no plan under [plans]: {plan!r}")
        if isinstance(share, bool) or not isinstance(share, (int, float)) \
                or not (math.isfinite(share) and 0 < share < 1):
            r.fail(f"reserve.{plan}", f"must be a share between 0 and 1 (0.2: 20 %), "
                   f"got {share!r}")
    total = sum(table.values())
    if table and total >= 1:
        r.fail("reserve", f"the shares sum to {total:g}; they must sum to less than 1 "
               "(what is left is the only part the other plans may use)")
    return {plan: float(share) for plan, share in table.items()}


def read_shards(r: TableReader, limits: Sequence[int | None],
                reserve: Mapping[str, float]) -> int:
    """``shards = N``: how many slots the guard's windows are spread over. Each shard holds
    its share of every limit, so each must let the least entitled plan at least 1 request."""
    shards: int = r.positive("shards", default=1)
    if shards > MAX_SHARDS:
        r.fail("shards", f"must be at most {MAX_SHARDS}, got {shards!r}")
    least = ceiling(reserve, None)
    for limit in limits:
        if limit and math.floor((limit // shards) * least + 1e-9) < 1:
            r.fail("shards", f"{shards} shards of a limit of {limit} per minute would leave "
                   "a shard with less than 1 unit for a plan without a reserve; use fewer")
    return shards


def ceiling(reserve: Mapping[str, float], plan: str | None) -> float:
    """The part of the guard's capacity ``plan`` may fill: all but the shares kept for the
    other plans (None: a plan holding no share)."""
    return 1.0 - sum(share for name, share in reserve.items() if name != plan)


def shard_share(limit: int, shards: int, shard: int) -> int:
    """Shard ``shard``'s part of ``limit``: floor or ceil, so that the parts sum to it."""
    return limit // shards + (1 if shard < limit % shards else 0)


def guard_limit(limit: int, shards: int, shard: int, part: float) -> int:
    """What one plan may fill of one shard of a window: whole units (counts are whole, so
    ``total + cost <= a`` reads the same), with float noise (1 - 0.2) kept from costing one."""
    return math.floor(shard_share(limit, shards, shard) * part + 1e-9)


def pace_share(args: Sequence[int], shards: int, shard: int) -> list[int]:
    """observe.lua's arguments for one shard: the provider's remaining requests and tokens
    split as the windows are (so together the shards spend what the provider said is left,
    not N times it); its resets and a hold apply to every shard alike."""
    out = list(args)
    for left in PACE_COUNTS:
        if out[left] >= 0:
            out[left] = shard_share(out[left], shards, shard)
    return out
