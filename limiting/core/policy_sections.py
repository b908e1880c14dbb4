"""The policy's tables about who is asking and who hears of it: ``[identity.jwt]`` and
``[alerts]`` (their use: core/jwt_identity.py, limiting/alerts.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .policy_reader import TableReader


@dataclass(frozen=True, slots=True)
class JwtClaims:
    """``[identity.jwt]``: the claims of a verified JWT that name the org and the plan."""

    org_claim: str = "org"
    plan_claim: str = "plan"


def read_jwt_claims(source: str, table: dict[str, Any]) -> JwtClaims:
    identity = TableReader(source, "identity", table)
    jwt = TableReader(source, "identity.jwt", identity.get("jwt", dict, {}))
    claims = JwtClaims(jwt.get("org_claim", str, "org"), jwt.get("plan_claim", str, "plan"))
    for name in ("org_claim", "plan_claim"):
        if not getattr(claims, name).strip():
            jwt.fail(name, "must name a claim")
    jwt.done()
    identity.done()
    return claims




def alerts_webhook(source: str, table: dict[str, Any]) -> str | None:
    """``[alerts] webhook_url``: where alert events are POSTed, if anywhere."""
    alerts = TableReader(source, "alerts", table)
    url: str | None = alerts.get("webhook_url", str)
    if url is not None and not url.startswith(("https://", "http://")):
        alerts.fail("webhook_url", f"must be an http(s) URL, got {url!r}")
    alerts.done()
    return url


# A tag is "name=value": what a key is for (project=search, env=prod), set on the key only.
TAG = re.compile(r"[A-Za-z0-9_.-]{1,64}=[A-Za-z0-9_.:/-]{1,128}")


def valid_tag(text: str) -> bool:
    return TAG.fullmatch(text) is not None


def check_tags(source: str, table: dict[str, Any]) -> None:
    """Every ``[tags."..."]`` name is a well-formed tag."""
    reader = TableReader(source, "tags", table)
    for name in table:
        if not valid_tag(name):
            reader.fail(f'"{name}"', "must be a tag like \"project=search\" (letters, digits, "
                        "_ . - around one =)")


def check_end_user(source: str, where: str, table: dict[str, Any]) -> None:
    """What ``end_user = {...}`` may not hold beyond an org's limits: alerts (one per end user
    would let a key holder's clients fill the alert outbox), or nothing at all."""
    reader = TableReader(source, where, table)
    if "alert_at" in table:
        reader.fail("alert_at", "is not taken here: alerts are for plans and orgs")
    if not table:
        reader.fail("", "needs at least one layer (quotas, tokens, dollars, ...)")


def aliases_of(r: TableReader) -> tuple[str, ...]:
    """A model's ``aliases``: the dated snapshots billed at its prices."""
    aliases = r.get("aliases", list, [])
    for i, alias in enumerate(aliases):
        if not isinstance(alias, str) or not alias.strip():
            r.fail(f"aliases[{i}]", f"must be a model name, got {alias!r}")
    return tuple(aliases)
