"""The providers are reached over https in production, and every other test's fake provider
speaks plain http. Here it serves TLS with a certificate of its own (trusted through
SSL_CERT_FILE, as an operator would trust a corporate proxy's), behind gunicorn's gevent
workers, whose SDKs the master imported before the fork after patching socket and ssl: both
SDKs, plain and streamed, get their answers through the patched TLS, and the master did load
the SDKs (a worker that imports them itself spends seconds of CPU at every start). A worker
forked from that master makes its clients' TLS with gevent's ssl."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import ROOT, keyed_app
from tests.policies import LOADED, plan, policy, served_by

pytestmark = pytest.mark.slow

POLICY = policy(
    store=LOADED, per_ip="100000 per 10 seconds", default="roomy",
    plans={"roomy": plan(500, 50, "10000 per day")},
    users={"keyed": "roomy"},
    models={"gpt-tls": served_by("openai", requests_per_minute=1000),
            "claude-tls": served_by("anthropic", requests_per_minute=1000)})
HELLO = [{"role": "user", "content": "hello"}]


def certificate(folder: Path) -> tuple[ssl.SSLContext, Path]:
    """A self-signed certificate for 127.0.0.1 (made with cryptography, a dependency already):
    the server's context and the file the client trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    made = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert, pem_key = folder / "cert.pem", folder / "key.pem"
    cert.write_bytes(made.public_bytes(serialization.Encoding.PEM))
    pem_key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, pem_key)
    return context, cert


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str
          ) -> Iterator[tuple[Any, Any, str]]:
    redis.Redis.from_url(redis_url).flushall()
    folder = tmp_path_factory.mktemp("tls")
    (folder / "limits.toml").write_text(POLICY)
    context, cert = certificate(folder)
    env = {"REDIS_URL": redis_url, "LIMITS_CONFIG": str(folder / "limits.toml"),
           "SSL_CERT_FILE": str(cert)}
    with keyed_app(folder, env, {"keyed": "roomy"}, workers=2, tls=context) as (
            server, fp, keys):
        assert fp.url.startswith("https://")
        yield server, fp, keys["keyed"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_both_sdks_are_served_through_tls_from_gevent_workers(stack: tuple[Any, Any, str],
                                                              stream: bool) -> None:
    server, fp, key = stack
    with openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0) as client:
        answer = client.chat.completions.create(model="gpt-tls", messages=HELLO,  # type: ignore[call-overload]
                                                max_tokens=20, stream=stream)
        texts = ([c.choices[0].delta.content or "" for c in answer if c.choices] if stream
                 else [answer.choices[0].message.content])
        assert "".join(texts)
    with anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0) as client:
        if stream:
            with client.messages.stream(model="claude-tls", messages=HELLO,  # type: ignore[arg-type]
                                        max_tokens=20) as events:
                assert "".join(events.text_stream)
        else:
            message = client.messages.create(model="claude-tls", messages=HELLO,  # type: ignore[arg-type]
                                             max_tokens=20)
            assert message.content[0].text  # type: ignore[union-attr]
    models = [r.body.get("model") for r in fp.requests]
    assert "gpt-tls" in models and "claude-tls" in models


def test_the_master_loads_the_sdks_once(stack: tuple[Any, Any, str]) -> None:
    server, _fp, _key = stack
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "pydantic_core" in maps      # the SDKs' types: imported by the master, before the fork


# The master's preload, then what gunicorn's gevent worker does after the fork: the clients'
# TLS, and anything the SDKs took from ssl when imported, must be gevent's, and gevent must
# not warn that ssl was patched too late.
WORKER = """
import sys, warnings
warnings.simplefilter("error")
from types import SimpleNamespace
from gunicorn.workers.ggevent import GeventWorker
from limiting import gunicorn as hooks
hooks._preload(SimpleNamespace(worker_class=GeventWorker))
assert "openai" in sys.modules and "anthropic" in sys.modules
from gevent import monkey
monkey.patch_all()
import anyio.streams.tls
from limiting.providers.clients import _tls
print(type(_tls()).__module__, anyio.streams.tls.SSLContext.__module__)
"""


def test_a_gevent_worker_forked_from_the_preloading_master_has_gevents_tls() -> None:
    env = {**os.environ, "OPENAI_API_KEY": "sk-fake", "ANTHROPIC_API_KEY": "sk-fake"}
    done = subprocess.run([sys.executable, "-c", WORKER], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["gevent.ssl", "gevent.ssl"]
