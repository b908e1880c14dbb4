"""JWT identity (limiting/core/jwt_identity.py) with real key pairs: what verifies, what a
client cannot choose (algorithm, key, plan), and how often the JWKS is read."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from limiting.core.jwt_identity import (
    InvalidToken,
    JwtSettings,
    JwtVerifier,
    KeySet,
    KeysUnavailable,
    looks_like_jwt,
)
from limiting.core.policy import JwtClaims, PolicyError, parse_policy
from tests.webhooks import JwksServer

DEFAULT_POLICY = Path(__file__).parent.parent / "limiting" / "default_limits.toml"
ISS, AUD = "https://idp.example", "llm-gateway"


class Signer:
    """One key pair of the identity provider, and its public JWK."""

    def __init__(self, alg: str, kid: str) -> None:
        self.alg, self.kid = alg, kid
        if alg == "RS256":
            self.private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        elif alg == "ES256":
            self.private = ec.generate_private_key(ec.SECP256R1())
            jwk = ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            self.private = ed25519.Ed25519PrivateKey.generate()
            jwk = OKPAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.jwk = {**jwk, "kid": kid, "alg": alg, "use": "sig"}

    def token(self, **claims: Any) -> str:
        now = int(time.time())
        body = {"sub": "alice", "iss": ISS, "aud": AUD, "iat": now, "exp": now + 600, **claims}
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, self.private, algorithm=self.alg, headers={"kid": self.kid})

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(  # type: ignore[no-any-return]
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def hs256_by_hand(claims: dict[str, Any], secret: bytes, kid: str) -> str:
    def b64(raw: bytes) -> str:
        return jwt.utils.base64url_encode(raw).decode()

    signing = (b64(json.dumps({"alg": "HS256", "kid": kid, "typ": "JWT"}).encode()) + "."
               + b64(json.dumps(claims).encode()))
    mac = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{b64(mac)}"


@pytest.fixture(scope="module")
def signers() -> dict[str, Signer]:
    return {alg: Signer(alg, f"k-{alg}") for alg in ("RS256", "ES256", "EdDSA")}


def write_jwks(path: Path, *signers: Signer, extra: list[dict[str, Any]] | None = None) -> str:
    path.write_text(json.dumps({"keys": [s.jwk for s in signers] + (extra or [])}))
    return str(path)


@pytest.fixture
def verifier(tmp_path: Path, signers: dict[str, Signer]) -> JwtVerifier:
    jwks = write_jwks(tmp_path / "jwks.json", *signers.values())
    return JwtVerifier(JwtSettings(jwks, ISS, AUD))


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_each_asymmetric_algorithm_verifies_and_names_user_plan_org(
        verifier: JwtVerifier, signers: dict[str, Signer], alg: str) -> None:
    who = verifier.verify(signers[alg].token(plan="pro", org="acme"))
    assert (who.user, who.plan, who.org) == ("alice", "pro", "acme")


def test_absent_claims_are_none_and_claim_names_come_from_the_policy(
        tmp_path: Path, signers: dict[str, Signer]) -> None:
    jwks = write_jwks(tmp_path / "jwks.json", signers["RS256"])
    plain = JwtVerifier(JwtSettings(jwks, ISS, AUD))
    who = plain.verify(signers["RS256"].token())
    assert (who.plan, who.org) == (None, None)
    named = JwtVerifier(JwtSettings(jwks, ISS, AUD), JwtClaims("tenant", "tier"))
    who = named.verify(signers["RS256"].token(tier="free", tenant="globex", plan="pro"))
    assert (who.plan, who.org) == ("free", "globex")


# exp and nbf as seconds from when the token is made (not from collection: a long run would
# turn "120 s from now" into the past by the time the test runs).
@pytest.mark.parametrize("claims, reason", [
    ({"exp": -31}, "expired"),
    ({"nbf": 120}, "not valid yet"),
    ({"iss": "https://evil.example"}, "(?i)issuer"),
    ({"aud": "another-service"}, "(?i)audience"),
    ({"exp": None}, "exp"),
    ({"sub": None}, "sub"),
    ({"sub": ""}, "sub"),
    ({"sub": "x" * 10_000}, "sub"),
    ({"plan": 7}, "plan"),
    ({"org": ["acme"]}, "org"),
])
def test_a_bad_claim_is_refused_with_its_reason(verifier: JwtVerifier,
                                               signers: dict[str, Signer],
                                               claims: dict[str, Any], reason: str) -> None:
    now = int(time.time())
    claims = {k: now + v if k in ("exp", "nbf") and isinstance(v, int) else v
              for k, v in claims.items()}
    with pytest.raises(InvalidToken, match=reason):
        verifier.verify(signers["ES256"].token(**claims))


def test_within_the_30_second_leeway_a_token_still_verifies(
        verifier: JwtVerifier, signers: dict[str, Signer]) -> None:
    now = int(time.time())
    assert verifier.verify(signers["RS256"].token(exp=now - 20)).user == "alice"
    assert verifier.verify(signers["RS256"].token(nbf=now + 20)).user == "alice"


def test_a_client_cannot_choose_the_algorithm_or_the_key(
        verifier: JwtVerifier, signers: dict[str, Signer], tmp_path: Path) -> None:
    rs = signers["RS256"]
    good = rs.token()
    head, _body, sig = good.split(".")
    # Unsigned ("alg": "none").
    none = jwt.encode({"sub": "alice", "iss": ISS, "aud": AUD, "exp": time.time() + 60},
                      None, algorithm="none", headers={"kid": rs.kid})
    # The RSA public key used as an HMAC secret (the classic confusion), made by hand:
    # PyJWT itself refuses to sign HS256 with a PEM.
    confused = hs256_by_hand({"sub": "alice", "iss": ISS, "aud": AUD,
                              "exp": int(time.time()) + 60}, rs.public_pem(), rs.kid)
    forged = hs256_by_hand({"sub": "alice", "iss": ISS, "aud": AUD,
                            "exp": int(time.time()) + 60}, b"0" * 32, rs.kid)
    # Another key pair's signature under the known kid.
    stranger = Signer("RS256", rs.kid).token()
    # A signature moved onto other claims.
    other_body = signers["RS256"].token(sub="mallory").split(".")[1]
    for token in (none, confused, forged, stranger, f"{head}.{other_body}.{sig}"):
        with pytest.raises(InvalidToken):
            verifier.verify(token)
    # An ES256 header on an RSA key's kid is refused, not verified as RSA.
    es_token = signers["ES256"].token()
    es_head = jwt.utils.base64url_encode(json.dumps(
        {"alg": "ES256", "kid": rs.kid, "typ": "JWT"}).encode()).decode()
    with pytest.raises(InvalidToken):
        verifier.verify(f"{es_head}.{es_token.split('.', 1)[1]}")


def test_hs256_only_with_the_operators_secret(tmp_path: Path,
                                              signers: dict[str, Signer]) -> None:
    secret = "s" * 48
    claims = {"sub": "svc", "iss": ISS, "aud": AUD, "exp": int(time.time()) + 60}
    token = jwt.encode(claims, secret, algorithm="HS256")
    with pytest.raises(InvalidToken, match="algorithm"):
        JwtVerifier(JwtSettings(write_jwks(tmp_path / "j.json", signers["RS256"]),
                                ISS, AUD)).verify(token)
    both = JwtVerifier(JwtSettings(str(tmp_path / "j.json"), ISS, AUD, secret))
    assert both.verify(token).user == "svc"
    assert both.verify(signers["RS256"].token()).user == "alice"   # the JWKS still works
    with pytest.raises(InvalidToken):
        both.verify(jwt.encode(claims, "t" * 48, algorithm="HS256"))
    only = JwtVerifier(JwtSettings(None, ISS, AUD, secret))
    assert only.verify(token).user == "svc"
    with pytest.raises(InvalidToken, match="algorithm"):
        only.verify(signers["RS256"].token())


def test_a_symmetric_or_broken_key_in_the_jwks_is_ignored(
        tmp_path: Path, signers: dict[str, Signer]) -> None:
    oct_key = {"kty": "oct", "k": jwt.utils.base64url_encode(b"k" * 32).decode(),
               "kid": "sym", "alg": "HS256"}
    broken = {"kty": "RSA", "kid": "bad", "n": "!!", "e": "AQAB"}
    enc_only = {**signers["ES256"].jwk, "use": "enc"}
    jwks = write_jwks(tmp_path / "j.json", signers["RS256"], extra=[oct_key, broken, enc_only])
    verifier = JwtVerifier(JwtSettings(jwks, ISS, AUD))
    assert verifier.verify(signers["RS256"].token()).user == "alice"
    hs = jwt.encode({"sub": "x", "iss": ISS, "aud": AUD, "exp": time.time() + 60}, b"k" * 32,
                    algorithm="HS256", headers={"kid": "sym"})
    with pytest.raises(InvalidToken):
        verifier.verify(hs)
    with pytest.raises(InvalidToken, match="unknown kid"):
        verifier.verify(signers["ES256"].token())


def test_garbage_is_refused_and_only_jwt_shaped_tokens_are_tried(verifier: JwtVerifier) -> None:
    assert not looks_like_jwt("llm_" + "a" * 43)
    assert looks_like_jwt("a.b.c") and not looks_like_jwt("a." * 5000 + "b")
    for token in ("a.b.c", "....", "eyJhbGciOiJSUzI1NiJ9.e30.", "\u0000.\u00ff.x"):
        with pytest.raises(InvalidToken):
            verifier.verify(token)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_unknown_kids_reread_the_jwks_at_most_once_a_minute_and_a_rotation_is_picked_up(
        tmp_path: Path, signers: dict[str, Signer]) -> None:
    path = tmp_path / "jwks.json"
    write_jwks(path, signers["RS256"])
    clock = Clock()
    keyset = KeySet(str(path), clock)
    reads = []
    real_read = keyset._read

    def counting_read() -> Any:
        reads.append(clock.now)
        return real_read()

    keyset._read = counting_read   # type: ignore[method-assign]
    verifier = JwtVerifier(JwtSettings(str(path), ISS, AUD))
    verifier.keyset = keyset
    assert verifier.verify(signers["RS256"].token()).user == "alice"
    rotated = Signer("RS256", "k-new")
    write_jwks(path, signers["RS256"], rotated)
    for _ in range(50):   # a flood of unknown kids inside the minute: no reread
        with pytest.raises(InvalidToken, match="unknown kid"):
            verifier.verify(rotated.token())
    assert len(reads) == 1
    clock.now += 60
    assert verifier.verify(rotated.token()).user == "alice"
    assert len(reads) == 2


@pytest.fixture
def jwks_server(signers: dict[str, Signer]) -> Iterator[JwksServer]:
    server = JwksServer({"keys": [signers["EdDSA"].jwk]})
    try:
        yield server
    finally:
        server.close()


def test_a_jwks_url_is_fetched_once_and_cached(jwks_server: JwksServer,
                                              signers: dict[str, Signer]) -> None:
    verifier = JwtVerifier(JwtSettings(jwks_server.url, ISS, AUD))
    for _ in range(5):
        assert verifier.verify(signers["EdDSA"].token()).user == "alice"
    assert jwks_server.fetches == 1
    with pytest.raises(InvalidToken):
        verifier.verify(signers["RS256"].token())   # unknown kid: fetched again? not yet
    assert jwks_server.fetches == 1


def test_an_unreachable_jwks_is_ours_not_the_clients(jwks_server: JwksServer,
                                                     signers: dict[str, Signer]) -> None:
    jwks_server.fail = True
    verifier = JwtVerifier(JwtSettings(jwks_server.url, ISS, AUD))
    with pytest.raises(KeysUnavailable):
        verifier.verify(signers["EdDSA"].token())
    # Keys once read stay in use while the provider is down.
    jwks_server.fail = False
    keyset = verifier.keyset
    assert keyset is not None
    keyset.fetched_at = None
    assert verifier.verify(signers["EdDSA"].token()).user == "alice"
    jwks_server.fail = True
    keyset.fetched_at = None
    assert verifier.verify(signers["EdDSA"].token()).user == "alice"


def test_identity_jwt_in_the_policy_is_checked() -> None:
    base = tomllib.loads(DEFAULT_POLICY.read_text())
    assert parse_policy(base).jwt_claims == JwtClaims()
    named = parse_policy({**base, "identity": {"jwt": {"org_claim": "tenant"}}})
    assert named.jwt_claims == JwtClaims("tenant", "plan")
    for bad in ({"jwt": {"org_claim": ""}}, {"jwt": {"plan": "x"}}, {"saml": {}},
                {"jwt": {"plan_claim": 3}}):
        with pytest.raises(PolicyError):
            parse_policy({**base, "identity": bad})
