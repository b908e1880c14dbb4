"""The bill audit: the fake provider meters what it would bill (every token it generated,
also those generated before a client hung up or timed out), and after 1,000 mixed calls
through both SDKs our windows must hold at least that (no free work) and at most what was
reserved (no phantom charges), with zero 5xx of our own and zero leases left.

Bounded: ~1,000 calls from 12 threads plus one batch of timeouts. The token and dollar
windows are a day long, so however long a loaded machine takes, nothing leaves them before
they are read (a minute's window did, when a run took longer than its minute).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import redis

from app import create_app
from fakeprovider import FakeProvider
from limiting.core.llm import estimate_input_tokens
from tests.conftest import Gunicorn, write_policy
from tests.policies import loaded_toml

GPT, CLAUDE = "gpt-4o-mini", "claude-3-5-haiku-latest"
PRICES = {GPT: (0.15, 0.60), CLAUDE: (0.80, 4.00)}        # USD per million in, out
TOKENS, BUDGET = 50_000_000, 100_000.0
POLICY = loaded_toml() + f"""
[edge]
per_ip = ["1000000 per minute"]
[defaults]
plan = "audit"
[plans.audit]
burst = 100000
refill_per_second = 10000
tokens_per_day = {TOKENS}
budget_usd_per_day = {BUDGET}
max_concurrent = 16
default_max_tokens = 64
[models."{GPT}"]
provider = "openai"
input_usd_per_million = {PRICES[GPT][0]}
output_usd_per_million = {PRICES[GPT][1]}
[models."{CLAUDE}"]
provider = "anthropic"
input_usd_per_million = {PRICES[CLAUDE][0]}
output_usd_per_million = {PRICES[CLAUDE][1]}
"""
VOCABULARY = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf"]
KINDS = (["plain"] * 20 + ["stream"] * 15 + ["cut"] * 20 + ["upstream-error"] * 10
         + ["broken"] * 5 + ["unknown-model"] * 5 + ["absurd"] * 5)
TIMEOUTS = 16


@dataclass
class Call:
    kind: str
    model: str
    estimate: int
    max_tokens: int
    outcome: str          # "ok", "cut", or "<status>:<code>"

    @property
    def admitted(self) -> bool:
        """Reached reserve() and passed: everything but our refusals and bad input."""
        # Every 429 is ours (an upstream 429 reaches the client as 503 upstream_rate_limited).
        return self.kind not in ("unknown-model", "absurd") and not self.outcome.startswith(
            ("429:", "400:", "404:"))

    def reserved_micros(self) -> float:
        price_in, price_out = PRICES[self.model]
        return self.estimate * price_in + self.max_tokens * price_out


@pytest.fixture
def stack(gunicorn, tmp_path: Path, r: redis.Redis, unix_url: str
          ) -> Iterator[tuple[Gunicorn, FakeProvider, object, str]]:
    with open_stack(gunicorn, tmp_path, unix_url, POLICY, "audited") as opened:
        yield opened


@contextmanager
def open_stack(gunicorn: Any, tmp_path: Path, unix_url: str, text: str, user: str,
               fake: dict[str, Any] | None = None,
               **env: str) -> Iterator[tuple[Gunicorn, FakeProvider, Any, str]]:
    """gunicorn on ``text``'s policy before the fake provider (``fake``: its options), the
    same app in this process, and a key of ``user`` on the audit plan."""
    policy = write_policy(tmp_path, text)
    prices = {m: {"input": p[0], "output": p[1], "cached_input": p[0] / 2,
                  "cache_write": p[0] * 1.25} for m, p in PRICES.items()}
    with FakeProvider(chunk_delay=0.002, prices=prices, **(fake or {})) as fp:
        server = gunicorn(**{"REDIS_URL": unix_url, "LIMITS_CONFIG": policy,
                             "WEB_CONCURRENCY": "2", "UPSTREAM_TIMEOUT": "1.5",
                             "OPENAI_API_KEY": "sk-fake", "OPENAI_BASE_URL": fp.url + "/v1",
                             "ANTHROPIC_API_KEY": "sk-fake", "ANTHROPIC_BASE_URL": fp.url,
                             **env})
        app = create_app({"REDIS_URL": unix_url, "LIMITS_CONFIG": policy, **env})
        key, _ = app.extensions["llm_limiter"].keys.create(user, plan="audit")
        yield server, fp, app, key


def _messages(rng: random.Random) -> list[dict[str, str]]:
    text = " ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(1, 30)))
    return [{"role": "user", "content": text}]


def _status(exc: openai.APIStatusError | anthropic.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    inner = body.get("error", body) if isinstance(body, dict) else {}
    code = inner.get("code") or inner.get("type") if isinstance(inner, dict) else None
    return f"{exc.status_code}:{code}"


def one(kind: str, server: Gunicorn, key: str, fp: FakeProvider, rng: random.Random,
        clients: threading.local) -> Call:
    if not hasattr(clients, "oai"):
        clients.oai = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0,
                                    timeout=20)
        clients.ant = anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0,
                                          timeout=20)
    oai: openai.OpenAI = clients.oai
    ant: anthropic.Anthropic = clients.ant
    model = rng.choice([GPT, CLAUDE])
    messages = _messages(rng)
    max_tokens = rng.randint(1, 40)
    call = Call(kind, model, estimate_input_tokens(messages), max_tokens, "ok")

    def create(name: str) -> None:
        """One call, not streamed, to ``name`` through the SDK of the model's provider."""
        if model == GPT:
            oai.chat.completions.create(model=name, messages=messages,  # type: ignore[arg-type]
                                        max_tokens=max_tokens)
        else:
            ant.messages.create(model=name, messages=messages,  # type: ignore[arg-type]
                                max_tokens=max_tokens)

    try:
        if kind == "unknown-model":
            create(model + "-2099-01-01")
        elif kind == "absurd":
            path, auth = (("/v1/chat/completions", {"Authorization": f"Bearer {key}"})
                          if model == GPT else ("/v1/messages", {"x-api-key": key}))
            huge = rng.choice(["1" + "0" * 400, "1e308", "-1", "99999999999999999999"])
            raw = (f'{{"model": "{model}", "max_tokens": {huge}, '
                   '"messages": [{"role": "user", "content": "hi"}]}')
            resp = httpx.post(server.url + path, content=raw, timeout=20,
                              headers={**auth, "Content-Type": "application/json"})
            body = resp.json()
            inner = body.get("error", {})
            call.outcome = f"{resp.status_code}:{inner.get('code') or inner.get('type')}"
        elif kind in ("plain", "upstream-error"):
            if kind == "upstream-error":
                # A 429/529 holds the model for everyone (a shared-limit signal), for the
                # provider's retry-after: a short one keeps the mix flowing.
                fp.fail_next(rng.choice([429, 500, 529]), retry_after_ms=20)
            create(model)
        else:
            if kind == "broken":
                fp.disconnect_mid_stream()
            keep = rng.randint(1, 6) if kind == "cut" else None
            if model == GPT:
                stream = oai.chat.completions.create(
                    model=model, messages=messages, max_tokens=max_tokens,  # type: ignore[arg-type]
                    stream=True)
                for i, _ in enumerate(stream):
                    if keep is not None and i + 1 >= keep:
                        break
                stream.close()
            else:
                with ant.messages.stream(model=model, messages=messages,  # type: ignore[arg-type]
                                         max_tokens=max_tokens) as s:
                    for i, _ in enumerate(s):
                        if keep is not None and i + 1 >= keep:
                            break
            if keep is not None:
                call.outcome = "cut"
    except (openai.APIStatusError, anthropic.APIStatusError) as exc:
        call.outcome = _status(exc)
    except (openai.APIError, anthropic.APIError) as exc:
        call.outcome = f"stream-error:{type(exc).__name__}"
    return call


def layers_left(app: object, user: str) -> dict[str, int]:
    limiter = app.extensions["llm_limiter"]  # type: ignore[attr-defined]
    plan = limiter.policy.plans["audit"]
    return {s.layer.name: s.remaining for s in limiter.engine.peek(user, plan).states}


@pytest.mark.slow
def test_bill_audit_no_free_work_no_phantom_charges(stack, r: redis.Redis) -> None:
    server, fp, app, key = stack
    clients = threading.local()
    started = time.monotonic()
    with ThreadPoolExecutor(12) as pool:
        calls = list(pool.map(lambda i: one(random.Random(i).choice(KINDS), server, key, fp,
                                            random.Random(i), clients), range(1000 - TIMEOUTS)))
        # Calls the provider answers only after our upstream timeout: it still bills them.
        fp.set_delay(3.0)
        calls += list(pool.map(lambda i: one("plain", server, key, fp, random.Random(i),
                                             clients), range(5000, 5000 + TIMEOUTS)))
    fp.set_delay(0.0)
    fp.quiesce(timeout=10)
    elapsed = time.monotonic() - started
    outcomes = Counter(c.outcome for c in calls)
    print(f"\naudit: {elapsed:.1f}s, outcomes {dict(outcomes)}")

    ours = [c for c in calls if c.outcome.startswith(("500:", "503:limiter"))]
    assert not ours, f"5xx of our own: {ours[:3]}"
    served_log = server.log.read_text()
    assert "unhandled error" not in served_log and "limiter_unavailable" not in served_log
    assert outcomes["ok"] > 300 and outcomes["cut"] > 100
    assert sum(c.outcome.startswith("504:") for c in calls) >= TIMEOUTS // 2
    assert sum(c.outcome.startswith("404:") for c in calls) > 0

    # Streams cut short settle as their worker sees it: at once, or within a loaded box's bound
    # (under the 60 s lease TTL, so a lease left behind still shows).
    deadline = time.monotonic() + 30
    while r.zcard("rl:{u:audited}:cc") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.zcard("rl:{u:audited}:cc") == 0, "a lease was left behind"

    meter = fp.meter()
    left = layers_left(app, "audited")
    used_tokens = TOKENS - left["tokens-day"]
    used_micros = round(BUDGET * 1e6) - left["usd-day"]
    billed_tokens = meter.input_tokens + meter.cache_write_tokens + meter.output_tokens
    admitted = [c for c in calls if c.admitted]
    reserved_tokens = sum(c.estimate + c.max_tokens for c in admitted)
    reserved_micros = sum(c.reserved_micros() for c in admitted)
    print(f"tokens: billed {billed_tokens} <= charged {used_tokens} <= reserved "
          f"{reserved_tokens}; micro-USD: billed {meter.usd * 1e6:.0f} <= charged "
          f"{used_micros} <= reserved {reserved_micros:.0f}")
    assert billed_tokens > 0 and meter.usd > 0
    assert used_tokens >= billed_tokens, "the provider billed work we did not charge"
    assert used_tokens <= reserved_tokens, "we charged more than was ever reserved"
    slack = len(calls)                         # each settle rounds to a whole micro-dollar
    assert used_micros >= meter.usd * 1e6 - slack
    assert used_micros <= reserved_micros + slack
