"""Who a presented credential names: an API key (limiting/keys.py) or, with JWT_JWKS (or
JWT_HS256_SECRET) set, a JWT from the company's identity provider (core/jwt_identity.py).

Both give a KeyRecord, so everything after authentication (plan, org, realm, ledger) is the
same for either; a JWT's record bears no tags (only an API key's does). A JWT's user meets
the same limits as that user's API keys: the identity provider vouches for ``sub`` as the key
store vouches for a key's user.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flask import Flask

from ..core.jwt_identity import (
    InvalidToken,
    JwtVerifier,
    KeysUnavailable,
    looks_like_jwt,
    settings_from,
)
from ..core.policy import Policy
from ..keys import ApiKeys, KeyRecord
from .configured import setting

log = logging.getLogger("limiter.auth")

__all__ = ["Credentials", "InvalidToken", "KeysUnavailable"]


class Credentials:
    """Authenticates API keys, and JWTs when configured."""

    def __init__(self, keys: Callable[[], ApiKeys], policy: Callable[[], Policy],
                 verifier: JwtVerifier | None) -> None:
        self.keys, self.policy, self.verifier = keys, policy, verifier

    @classmethod
    def from_config(cls, app: Flask, keys: Callable[[], ApiKeys],
                    policy: Callable[[], Policy]) -> Credentials:
        """JWT_* from the app's config, then the environment."""
        settings = settings_from(lambda name: setting(app, name))
        verifier = JwtVerifier(settings) if settings.enabled else None
        return cls(keys, policy, verifier)

    def authenticate(self, presented: str | None) -> KeyRecord | None:
        """The record a credential names, or None when it names nobody. Raises InvalidToken
        for a JWT we refuse (its reason is the client's to read) and KeysUnavailable when the
        identity provider's keys cannot be read."""
        if presented and self.verifier is not None and looks_like_jwt(presented):
            return self._from_jwt(presented)
        return self.keys().authenticate(presented)

    def _from_jwt(self, token: str) -> KeyRecord:
        assert self.verifier is not None
        policy = self.policy()
        who = self.verifier.verify(token, policy.jwt_claims)
        if who.plan is not None and who.plan not in policy.plans:
            # Never the default plan: a token naming a plan we lack is a mistake to fix.
            raise InvalidToken(f"The JWT names plan {who.plan!r}, which this policy does "
                               "not have.")
        if who.org is not None and who.org not in policy.orgs:
            raise InvalidToken(f"The JWT names org {who.org!r}, which this policy does not "
                               "have.")
        plan = who.plan or policy.users.get(who.user, policy.default_plan)
        # No tags: they are set on an API key by an operator (keys create --tag), and no
        # claim of a token stands in for that.
        return KeyRecord("", who.user, plan, None, who.issued_at, False, who.org)
