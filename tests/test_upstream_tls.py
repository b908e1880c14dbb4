"""The providers are reached over https in production, and every other test's fake provider
speaks plain http. Here it serves TLS with a certificate of its own (trusted through
SSL_CERT_FILE, as an operator would trust a corporate proxy's), behind gunicorn's gevent
workers, whose SDKs the master imported before the fork after patching socket and ssl: both
SDKs, plain and streamed, get their answers through the patched TLS, and the master did load
the SDKs (a worker that imports them itself spends seconds of CPU at every start)."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import redis

from tests.conftest import keyed_app
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
    """A self-signed certificate for 127.0.0.1: the server's context and the file to trust."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
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


def test_the_master_loads_the_sdks_once_and_gevent_is_not_patched_late(
        stack: tuple[Any, Any, str]) -> None:
    server, _fp, _key = stack
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "pydantic_core" in maps      # the SDKs' types: imported by the master, before the fork
    assert "MonkeyPatchWarning" not in server.log.read_text()
