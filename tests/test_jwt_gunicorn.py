"""JWT identity end to end: gunicorn with two workers on a real Valkey, the real openai and
anthropic SDKs presenting tokens signed by a real key pair, API keys working beside them;
a bad token is a 401 in the dialect's shape and spends nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import jwt
import openai
import pytest
import redis
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from flask import Flask
from jwt.algorithms import OKPAlgorithm, RSAAlgorithm

from app import create_app
from tests.conftest import keyed_app
from tests.policies import LOADED, plan, policy

pytestmark = pytest.mark.slow

ISS, AUD = "https://idp.example", "llm-gateway"
HS_SECRET = "hs-secret-" + "x" * 40
POLICY = policy(
    store=LOADED, per_ip="100000 per 10 seconds", default="roomy",
    plans={"roomy": plan(500, 50, "10000 per day"), "tiny": plan(3, 0.001)},
    users={"keyed": "roomy"},
) + '\n[orgs.acme]\nquotas = ["1000 per day"]\n'
HELLO = [{"role": "user", "content": "hello"}]


@dataclass
class Idp:
    rsa_key: Any
    ed_key: Any

    def token(self, key: str = "rsa", **claims: Any) -> str:
        now = int(time.time())
        body = {"sub": "alice", "iss": ISS, "aud": AUD, "iat": now, "exp": now + 600, **claims}
        body = {k: v for k, v in body.items() if v is not None}
        if key == "hs":
            return jwt.encode(body, HS_SECRET, algorithm="HS256")
        private, alg = (self.rsa_key, "RS256") if key == "rsa" else (self.ed_key, "EdDSA")
        return jwt.encode(body, private, algorithm=alg, headers={"kid": key})


@dataclass
class Stack:
    url: str
    idp: Idp
    keys: dict[str, str]
    app: Flask

    def left(self, user: str, plan_name: str) -> dict[str, int]:
        limiter = self.app.extensions["llm_limiter"]
        plan_ = limiter.policy.plans[plan_name]
        return {s.layer.name: s.remaining for s in limiter.engine.peek(user, plan_).states}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    redis.Redis.from_url(redis_url).flushall()
    folder = tmp_path_factory.mktemp("jwt")
    (folder / "limits.toml").write_text(POLICY)
    idp = Idp(rsa.generate_private_key(public_exponent=65537, key_size=2048),
              ed25519.Ed25519PrivateKey.generate())
    jwks = {"keys": [
        {**RSAAlgorithm.to_jwk(idp.rsa_key.public_key(), as_dict=True), "kid": "rsa",
         "alg": "RS256", "use": "sig"},
        {**OKPAlgorithm.to_jwk(idp.ed_key.public_key(), as_dict=True), "kid": "ed",
         "alg": "EdDSA", "use": "sig"}]}
    (folder / "jwks.json").write_text(json.dumps(jwks))
    env = {"REDIS_URL": redis_url, "LIMITS_CONFIG": str(folder / "limits.toml"),
           "JWT_JWKS": str(folder / "jwks.json"), "JWT_ISSUER": ISS, "JWT_AUDIENCE": AUD,
           "JWT_HS256_SECRET": HS_SECRET}
    with keyed_app(folder, env, {"keyed": "roomy"}, workers=2) as (server, _fp, keys):
        yield Stack(server.url, idp, keys, create_app(dict(env)))


def oai(s: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0)


def ant(s: Stack, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=s.url, api_key=key, max_retries=0)


def test_both_sdks_are_served_on_a_verified_jwt_and_an_api_key_beside_it(s: Stack) -> None:
    with oai(s, s.idp.token(sub="jwt-openai")) as client:
        reply = client.chat.completions.create(model="echo", messages=HELLO)
    assert reply.choices[0].message.content == "echo: hello"
    with ant(s, s.idp.token("ed", sub="jwt-anthropic")) as client:
        message = client.messages.create(model="echo", max_tokens=5, messages=HELLO)
    assert message.content[0].text == "echo: hello"
    with oai(s, s.idp.token("hs", sub="jwt-hs")) as client:
        assert client.chat.completions.create(model="echo", messages=HELLO).choices
    with oai(s, s.keys["keyed"]) as client:
        assert client.chat.completions.create(model="echo", messages=HELLO).choices


@pytest.fixture
def s(stack: Stack) -> Stack:
    return stack


def test_the_plan_claim_sets_the_limits_exactly_across_workers(s: Stack) -> None:
    token = s.idp.token(sub="tiny-user", plan="tiny")
    codes = [httpx.post(s.url + "/v1/chat/completions", json={
        "model": "echo", "messages": HELLO}, headers={"Authorization": f"Bearer {token}"},
        timeout=30).status_code for _ in range(6)]
    assert codes.count(200) == 3 and codes.count(429) == 3   # burst 3, no refill to speak of
    assert s.left("tiny-user", "tiny")["user"] == 0


@pytest.mark.parametrize("claims, reason", [
    ({"exp": -3600}, "expired"),     # seconds from when the token is made
    ({"aud": "another-service"}, "Audience"),
    ({"iss": "https://evil.example"}, "issuer"),
    ({"plan": "platinum"}, "plan 'platinum'"),
    ({"org": "globex"}, "org 'globex'"),
])
def test_a_refused_token_is_a_401_in_each_shape_and_spends_nothing(
        s: Stack, claims: dict[str, Any], reason: str) -> None:
    user = "victim"
    before = s.left(user, "roomy")
    now = int(time.time())
    token = s.idp.token(sub=user, **{k: now + v if k == "exp" else v for k, v in claims.items()})
    with pytest.raises(openai.AuthenticationError) as o, oai(s, token) as client:
        client.chat.completions.create(model="echo", messages=HELLO)
    error = o.value.response.json()["error"]
    assert error["code"] == "invalid_api_key" and reason in error["message"]
    with pytest.raises(anthropic.AuthenticationError) as a, ant(s, token) as client:
        client.messages.create(model="echo", max_tokens=5, messages=HELLO)
    assert a.value.response.json()["error"]["type"] == "authentication_error"
    assert s.left(user, "roomy") == before


def test_unsigned_forged_and_tampered_tokens_are_refused(s: Stack) -> None:
    good = s.idp.token(sub="victim")
    head, _body, sig = good.split(".")
    unsigned = jwt.encode({"sub": "victim", "iss": ISS, "aud": AUD,
                           "exp": int(time.time()) + 60}, None, algorithm="none")
    forged = jwt.encode({"sub": "victim", "iss": ISS, "aud": AUD,
                         "exp": int(time.time()) + 60}, "not-the-secret-" + "y" * 40,
                        algorithm="HS256")
    other = s.idp.token(sub="mallory", plan="roomy").split(".")[1]
    for token in (unsigned, forged, f"{head}.{other}.{sig}", "a.b.c"):
        reply = httpx.post(s.url + "/v1/chat/completions", json={
            "model": "echo", "messages": HELLO}, headers={"Authorization": f"Bearer {token}"},
            timeout=30)
        assert reply.status_code == 401, (token, reply.text)
        assert reply.json()["error"]["code"] == "invalid_api_key"
