"""Identity from the company's identity provider: a bearer token that is a JWT, verified
with PyJWT against a JWKS (a file, or an http(s) URL), names the user (``sub``) and, by the
claims ``[identity.jwt]`` names, the org and plan.

What a client cannot choose: the algorithm (RS256, ES256 and EdDSA from the JWKS, HS256 only
with an operator's secret, never "none", and a JWK verifies only with the algorithm it was
made for, so a public key is never used as an HMAC secret); the keys (only the operator's
JWKS, refetched on an unknown ``kid`` at most once a minute, so a flood of made-up ``kid``
values cannot make us hammer the identity provider); a plan or an org the policy does not
have (a 401, never the default plan). Without PyJWT installed this module still imports;
:func:`settings_from` refuses to start with JWT configured instead.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .naming import MAX_USER_ID_LENGTH
from .policy_sections import JwtClaims

ASYMMETRIC = ("RS256", "ES256", "EdDSA")
LEEWAY_SECONDS = 30
REFETCH_AT_MOST_EVERY = 60.0
MAX_JWKS_BYTES = 1 << 20
MAX_TOKEN_LENGTH = 8192
FETCH_TIMEOUT = 5.0


class InvalidToken(Exception):
    """The bearer token is a JWT we do not accept: the client's to fix (a 401)."""


class KeysUnavailable(Exception):
    """The JWKS could not be read: ours to fix, not the client's (a 503, nothing spent)."""


@dataclass(frozen=True, slots=True)
class JwtSettings:
    """Where the keys are and what a token must say, from JWT_* settings."""

    jwks: str | None = None
    issuer: str | None = None
    audience: str | None = None
    hs256_secret: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.jwks or self.hs256_secret)


@dataclass(frozen=True, slots=True)
class JwtIdentity:
    """Who a verified token names; ``plan``/``org`` None: the claim was absent."""

    user: str
    plan: str | None
    org: str | None
    issued_at: int


def settings_from(get: Callable[[str], Any]) -> JwtSettings:
    """JWT_JWKS, JWT_ISSUER, JWT_AUDIENCE and JWT_HS256_SECRET as ``get`` finds them (app
    config, then the environment); refuses to start when JWT is asked for without PyJWT."""
    settings = JwtSettings(*(get(name) or None for name in
                             ("JWT_JWKS", "JWT_ISSUER", "JWT_AUDIENCE", "JWT_HS256_SECRET")))
    if settings.enabled:
        try:
            import jwt  # noqa: F401
        except ImportError:
            raise RuntimeError("JWT_JWKS or JWT_HS256_SECRET is set but PyJWT is not "
                               "installed: pip install 'flask-llm-limiter[jwt]'") from None
    return settings


def looks_like_jwt(token: str) -> bool:
    """Three dot-separated parts: worth verifying (an API key has no dots)."""
    return token.count(".") == 2 and len(token) <= MAX_TOKEN_LENGTH


class KeySet:
    """The JWKS, read once and again only for a ``kid`` it lacks, at most once a minute."""

    def __init__(self, source: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.clock = clock
        self.lock = threading.Lock()
        self.keys: list[Any] = []           # PyJWK, one per usable key
        self.fetched_at: float | None = None

    def candidates(self, kid: str | None, alg: str) -> list[Any]:
        """The keys that may verify a token with this header; refetched once if none."""
        found = self._match(kid, alg)
        if not found and self._due():
            self.refresh()
            found = self._match(kid, alg)
        return found

    def _match(self, kid: str | None, alg: str) -> list[Any]:
        return [k for k in self.keys if k.algorithm_name == alg
                and (kid is None or k.key_id == kid)]

    def _due(self) -> bool:
        return self.fetched_at is None or self.clock() - self.fetched_at >= REFETCH_AT_MOST_EVERY

    def refresh(self) -> None:
        """Read the JWKS now (one reader at a time). A failure keeps the keys we had; with
        none yet it is KeysUnavailable (503), not the client's fault."""
        with self.lock:
            if not self._due():      # another thread refreshed while this one waited
                return
            self.fetched_at = self.clock()
            try:
                self.keys = _usable(self._read())
            except (OSError, ValueError) as exc:
                if not self.keys:
                    raise KeysUnavailable(f"JWT_JWKS {self.source}: {exc}") from None

    def _read(self) -> Mapping[str, Any]:
        if self.source.startswith(("https://", "http://")):
            with urllib.request.urlopen(self.source, timeout=FETCH_TIMEOUT) as reply:
                raw = reply.read(MAX_JWKS_BYTES + 1)
        else:
            with open(self.source, "rb") as fh:
                raw = fh.read(MAX_JWKS_BYTES + 1)
        if len(raw) > MAX_JWKS_BYTES:
            raise ValueError("larger than 1 MiB")
        document = json.loads(raw)
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError("not a JWKS (an object with a 'keys' list)")
        return document


def _usable(document: Mapping[str, Any]) -> list[Any]:
    """The asymmetric signing keys of a JWKS (a symmetric "oct" key there is ignored: a JWKS
    is public, and HS256 takes only the operator's own secret)."""
    from jwt import PyJWK
    from jwt.exceptions import PyJWTError

    keys = []
    for data in document.get("keys") or ():
        if not isinstance(data, dict) or data.get("use", "sig") != "sig":
            continue
        try:
            key = PyJWK(data)
        except (PyJWTError, ValueError, TypeError, KeyError):
            continue   # a key type we cannot use never stops the others
        if key.algorithm_name in ASYMMETRIC:
            keys.append(key)
    return keys


class JwtVerifier:
    """Verifies bearer JWTs by :class:`JwtSettings` and names who they are for."""

    def __init__(self, settings: JwtSettings, claims: JwtClaims | None = None) -> None:
        self.settings = settings
        self.claims = claims or JwtClaims()
        self.keyset = KeySet(settings.jwks) if settings.jwks else None

    def verify(self, token: str, claims: JwtClaims | None = None) -> JwtIdentity:
        """The identity a valid token names (``claims``: which claims name the org and plan,
        the policy's as of now); InvalidToken (401) or KeysUnavailable (503)."""
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise InvalidToken("The bearer token is not a well-formed JWT.") from None
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or not isinstance(kid, (str, type(None))):
            raise InvalidToken("The JWT's header needs a string alg (and kid, if any).")
        key: Any = self._key(alg, kid)
        settings = self.settings
        try:
            payload = jwt.decode(
                token, key, algorithms=[alg], issuer=settings.issuer,
                audience=settings.audience, leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "sub"], "verify_aud": settings.audience is not None})
        except jwt.ExpiredSignatureError:
            raise InvalidToken("The JWT has expired.") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("The JWT is not valid yet (nbf).") from None
        except jwt.InvalidTokenError as exc:
            raise InvalidToken(f"The JWT was refused: {_reason(exc)}.") from None
        return self._identity(payload, claims or self.claims)

    def _key(self, alg: str, kid: str | None) -> Any:
        if alg == "HS256" and self.settings.hs256_secret:
            return self.settings.hs256_secret.encode()
        if alg not in ASYMMETRIC or self.keyset is None:
            raise InvalidToken(f"The JWT's algorithm {alg!r} is not accepted here.")
        found = self.keyset.candidates(kid, alg)
        if not found:
            raise InvalidToken("No key of the identity provider's JWKS signed this JWT "
                               "(unknown kid).")
        return found[0]

    @staticmethod
    def _identity(claims: Mapping[str, Any], named: JwtClaims) -> JwtIdentity:
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub.strip() or len(sub) > MAX_USER_ID_LENGTH:
            raise InvalidToken(f"The JWT's sub must be 1..{MAX_USER_ID_LENGTH} characters.")
        plan = JwtVerifier._named(claims, named.plan_claim)
        org = JwtVerifier._named(claims, named.org_claim)
        iat = claims.get("iat")
        return JwtIdentity(sub, plan, org, int(iat) if isinstance(iat, (int, float)) else 0)

    @staticmethod
    def _named(claims: Mapping[str, Any], name: str) -> str | None:
        value = claims.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise InvalidToken(f"The JWT's {name!r} claim must be a non-empty string.")
        return value


def _reason(exc: Exception) -> str:
    """PyJWT's reason, short and without the token's text."""
    return str(exc).split("\n", 1)[0][:200] or type(exc).__name__
