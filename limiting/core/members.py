"""Who belongs to what: the ``[users]`` table (a plan, and an org) and the names API keys
hold that the policy may have dropped since.

``[users]`` takes two forms: ``"bob" = "pro"`` (a plan) and ``"alice" = { plan = "pro",
org = "acme" }`` (either key may be left out: the default plan, no org).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any

from .policy_reader import TableReader

log = logging.getLogger("limiter.policy")
_WARNED_REMOVED: set[tuple[str, str, str]] = set()


def read_members(source: str, table: Mapping[str, Any], default_plan: str,
                 plans: Collection[str], orgs: Collection[str]
                 ) -> tuple[dict[str, str], dict[str, str]]:
    """(user -> plan, user -> org) from ``[users]``; a name that is not under [plans] or
    [orgs] fails here, naming the user."""
    users: dict[str, str] = {}
    user_orgs: dict[str, str] = {}
    top = TableReader(source, "", {"users": dict(table)})
    for user, value in table.items():
        where = f'users."{user}"'
        if isinstance(value, str):
            plan, org = value, None
        elif isinstance(value, dict):
            r = TableReader(source, where, value)
            plan, org = r.get("plan", str, default_plan), r.get("org", str)
            r.done()
        else:
            top.fail(where, f"must be a plan name or a table like {{ plan = \"pro\", org = "
                            f"\"acme\" }}, got {value!r}")
        if plan not in plans:
            top.fail(where if isinstance(value, str) else where + ".plan",
                     f"names no plan under [plans]: {plan!r}")
        if org is not None and org not in orgs:
            top.fail(where + ".org", f"names no org under [orgs]: {org!r}")
        users[user] = plan
        if org is not None:
            user_orgs[user] = org
    return users, user_orgs


def warn_removed(source: str, what: str, name: str, instead: str) -> None:
    """One log line per name an API key holds that the policy no longer has: removing a plan
    or an org must not turn its keys' requests into 500s."""
    if (source, what, name) not in _WARNED_REMOVED:
        _WARNED_REMOVED.add((source, what, name))
        log.warning("%s %r is not in %s (removed?); its keys fall back to %s", what, name,
                    source, instead)
