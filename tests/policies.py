"""Policies for the tests, built from the few numbers each test cares about and written as
the TOML an operator writes (limits.toml), so every test file states its limits in a line or
two instead of a TOML page of its own."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# A loaded CI box must not turn decisions into store-unavailable answers: a generous budget.
LOADED = {"timeout_ms": 2000}

# A default plan "starter" and a bigger "pro" beside it.
STARTER_AND_PRO = {"starter": {"burst": 10, "refill_per_second": 0.5, "quotas": ["100 per day"]},
                   "pro": {"burst": 20, "refill_per_second": 2, "quotas": ["2000 per day"]}}


def plan(burst: float, refill: float, *quotas: str, **more: Any) -> dict[str, Any]:
    """A ``[plans.X]`` table: the bucket, its quotas, and any other key as TOML names it."""
    table: dict[str, Any] = {"burst": burst, "refill_per_second": refill}
    if quotas:
        table["quotas"] = list(quotas)
    return table | more


def served_by(provider: str, **more: Any) -> dict[str, Any]:
    """A ``[models."name"]`` table: the provider that serves the model, and its limits."""
    return {"provider": provider, **more}


def policy(*, plans: Mapping[str, Mapping[str, Any]], per_ip: str | None = None,
           default: str | None = None, store: Mapping[str, Any] | None = None,
           users: Mapping[str, str] | None = None,
           models: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """limits.toml text: the edge's per-IP limit, the default plan, the plans, users, models.

    ``store``: the [store] table, LOADED unless given: a loaded box must not turn a decision
    into a 503 by the 50 ms default (``store={}`` leaves the default to a test that wants it)."""
    tables: dict[str, Any] = {}
    store = LOADED if store is None else store
    if store:
        tables["store"] = store
    if per_ip:
        tables["edge"] = {"per_ip": [per_ip]}
    if default:
        tables["defaults"] = {"plan": default}
    tables["plans"] = plans
    if users:
        tables["users"] = users
    if models:
        tables["models"] = models
    return "".join(_table([name], table) for name, table in tables.items())


def write_policy(folder: Path, text: str) -> str:
    """``text`` as the folder's limits.toml; its path, for LIMITS_CONFIG."""
    path = folder / "limits.toml"
    path.write_text(text)
    return str(path)


def loaded_toml() -> str:
    """LOADED as a [store] table, for a test that writes its TOML by hand (or in front of the
    built-in policy)."""
    return _table(["store"], LOADED)


def _table(path: list[str], table: Mapping[str, Any]) -> str:
    values = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
    text = f"[{'.'.join(_key(p) for p in path)}]\n" if values or not table else ""
    text += "".join(f"{_key(k)} = {_value(v)}\n" for k, v in values.items())
    return text + "".join(_table([*path, k], v) for k, v in table.items()
                          if isinstance(v, Mapping))


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) else repr(value)


# A burst of one that refills in 100 s: the second request is refused with a long wait (the
# deny cache answers it a second at a time at most).
HELD = policy(store=LOADED, per_ip="100000 per minute",
              plans={"starter": plan(1, 0.01, "1000 per day"),
                     "pro": plan(100, 100, "1000 per day")})
