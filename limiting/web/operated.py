"""The app's limiter as the operator commands (`flask limits`, `flask keys`) see it: found in
``app.extensions`` by its key, without importing the extension that registers those commands
(so neither module imports the other)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, cast

from flask import current_app

from ..core.policy import Plan, Policy
from ..engine import Engine
from ..keys import ApiKeys
from ..stores.store import Store

EXTENSION_KEY = "llm_limiter"


class Operated(Protocol):
    """What the commands use of a RateLimiter."""

    @property
    def engine(self) -> Engine: ...

    @property
    def policy(self) -> Policy: ...

    @property
    def store(self) -> Store: ...

    @property
    def keys(self) -> ApiKeys: ...

    def plan_of_user(self, user: str, key_plans: Mapping[str, str] | None = None,
                     realm: str | None = None) -> Plan: ...

    def org_of_user(self, user: str, key_orgs: Mapping[str, str | None] | None = None
                    ) -> Plan | None: ...

    def realm_of_user(self, user: str, key_plans: Mapping[str, str] | None = None,
                      anonymous: bool | None = None) -> str: ...


def app_limiter() -> Operated:
    """The running app's limiter (``RateLimiter.init_app`` put it there)."""
    return cast(Operated, current_app.extensions[EXTENSION_KEY])
