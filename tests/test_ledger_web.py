"""The spend ledger end to end: a mixed run through both real SDKs (plain, streamed, cut,
upstream errors, broken streams) against gunicorn and the fake provider; the ledger must equal
what the settlements left in the user's dollar and token windows. A refused or cancelled call
books nothing. Then the readers: /v1/usage?days, /admin/spend (JSON, CSV), the CLI."""

from __future__ import annotations

import csv
import io
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import redis

from fakeprovider import FakeProvider
from limiting.ledger import Ledger, Spend
from tests.conftest import Gunicorn
from tests.test_bill_audit import BUDGET, CLAUDE, GPT, TOKENS, one, open_stack
from tests.test_bill_audit import POLICY as BILL_POLICY

ADMIN = "admin-secret-of-at-least-32-characters"
POLICY = BILL_POLICY + """
[plans.tiny]
burst = 1
refill_per_second = 0.001
quotas = ["1 per day"]
budget_usd_per_day = 10
"""
KINDS = ["plain"] * 8 + ["stream"] * 6 + ["cut"] * 6 + ["upstream-error"] * 4 + ["broken"] * 2


@pytest.fixture
def stack(gunicorn, tmp_path: Path, r: redis.Redis, unix_url: str
          ) -> Iterator[tuple[Gunicorn, FakeProvider, object, str]]:
    # A longer upstream timeout than the bill audit's: no call here is meant to time out.
    with open_stack(gunicorn, tmp_path, unix_url, POLICY, "spender", ADMIN_TOKEN=ADMIN,
                    UPSTREAM_TIMEOUT="5") as opened:
        yield opened


def used(app: object, user: str) -> tuple[int, int]:
    """(tokens, micro-dollars) the settlements left in the user's windows."""
    limiter = app.extensions["llm_limiter"]  # type: ignore[attr-defined]
    states = {s.layer.name: s.remaining
              for s in limiter.engine.peek(user, limiter.policy.plans["audit"]).states}
    return TOKENS - states["tokens-day"], round(BUDGET * 1e6) - states["usd-day"]


def today(app: object, user: str, key_id: str | None = None) -> Spend:
    ledger: Ledger = app.extensions["llm_limiter"].ledger  # type: ignore[attr-defined]
    return ledger.history(user, "u", ledger.days(1), key_id)[-1]


def settled(r: redis.Redis, user: str) -> None:
    # A cut stream settles when its worker sees it: a loaded box's bound, under the 60 s
    # lease TTL (so a lease left behind still shows).
    deadline = time.monotonic() + 30
    while r.zcard(f"rl:{{u:{user}}}:cc") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert r.zcard(f"rl:{{u:{user}}}:cc") == 0


@pytest.mark.slow
def test_the_ledger_equals_the_settlements(stack, r: redis.Redis) -> None:
    server, fp, app, key = stack
    clients = threading.local()
    with ThreadPoolExecutor(4) as pool:
        calls = list(pool.map(lambda i: one(KINDS[i % len(KINDS)], server, key, fp,
                                            random.Random(i), clients), range(60)))
    fp.quiesce(timeout=10)
    settled(r, "spender")
    assert {c.outcome for c in calls} >= {"ok", "cut"}
    tokens, micros = used(app, "spender")
    spend = today(app, "spender")
    assert spend.usd_micros == micros > 0
    assert spend.input_tokens + spend.output_tokens == tokens   # cache reads never count
    assert 0 < spend.requests <= len(calls)
    record = app.extensions["llm_limiter"].keys.authenticate(key)
    assert today(app, "spender", record.key_id) == spend
    ledger = app.extensions["llm_limiter"].ledger
    day = ledger.today()
    assert ledger.totals([day])[0] == spend
    by_model = ledger.models(day, [GPT, CLAUDE])
    assert sum(s.usd_micros for s in by_model.values()) == spend.usd_micros
    assert [(row.user, row.score) for row in ledger.top(day, 5)] == [("spender",
                                                                       spend.usd_micros)]

    # Cancelled (the provider refused before generating) and refused calls book nothing.
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    fp.fail_next(429, retry_after_ms=10)
    with pytest.raises(openai.APIStatusError):
        oai.chat.completions.create(model=GPT, messages=[{"role": "user", "content": "hi"}],
                                    max_tokens=5)
    assert today(app, "spender") == spend
    tiny_key, _ = app.extensions["llm_limiter"].keys.create("tiny-user", plan="tiny")
    tiny = openai.OpenAI(base_url=server.url + "/v1", api_key=tiny_key, max_retries=0)
    time.sleep(0.05)   # the model's hold from the 429 above has passed
    tiny.chat.completions.create(model=GPT, messages=[{"role": "user", "content": "hi"}],
                                 max_tokens=5)
    first = today(app, "tiny-user")
    assert first.requests == 1
    with pytest.raises(openai.RateLimitError):
        tiny.chat.completions.create(model=GPT, messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=5)
    assert today(app, "tiny-user") == first

    # Reading it: the caller's own history, the admin's JSON and CSV, the CLI.
    mine = httpx.get(server.url + "/v1/usage?days=7",
                     headers={"Authorization": f"Bearer {key}"}).json()
    assert len(mine["history"]) == 7 and mine["history"][-1] == spend.json()
    admin = {"Authorization": f"Bearer {ADMIN}"}
    top = httpx.get(server.url + "/admin/spend?top=20", headers=admin).json()
    assert [(row["user"], row["usd_micros"]) for row in top["top"]] == [
        ("spender", spend.usd_micros), ("tiny-user", first.usd_micros)]
    assert top["top"][0]["spark"][-1] == spend.usd_micros and len(top["daily"]) == 30
    assert top["total"]["usd_micros"] == spend.usd_micros + first.usd_micros
    assert httpx.get(server.url + "/admin/spend").status_code == 401
    text = httpx.get(server.url + "/admin/spend?format=csv", headers=admin).text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[0]["user"] == "spender" and int(rows[0]["usd_micros"]) == spend.usd_micros
    user = httpx.get(server.url + "/admin/spend/user/spender?days=30", headers=admin).json()
    assert user["days"][-1] == spend.json() and user["total"]["requests"] == spend.requests
    assert user["keys"][record.key_id][-1] == spend.json()
    as_csv = httpx.get(server.url + "/admin/spend/user/spender?days=3",
                       headers={**admin, "Accept": "text/csv"}).text
    assert len(list(csv.DictReader(io.StringIO(as_csv)))) == 6   # 3 days, all + one key
    bad = httpx.get(server.url + "/admin/spend?day=yesterday", headers=admin)
    assert bad.status_code == 400

    runner = app.test_cli_runner()
    out = runner.invoke(args=["spend", "top", "--top", "1"])
    assert out.exit_code == 0 and "spender" in out.output and "tiny-user" not in out.output
    assert f"{spend.usd:.6f}" in out.output
    out = runner.invoke(args=["spend", "top", "--day", "2001-01-01"])
    assert out.exit_code == 1 and "nobody" in out.output
    assert runner.invoke(args=["spend", "top", "--day", "nope"]).exit_code == 2
    out = runner.invoke(args=["spend", "user", "spender", "--days", "3"])
    assert out.exit_code == 0 and out.output.count("\n") == 6
    assert runner.invoke(args=["spend", "user", "nobody-at-all"]).exit_code == 1

    # ADMIN_TOKEN is set, so /metrics (spend per plan and model) needs it too.
    assert httpx.get(server.url + "/metrics").status_code == 401
    metrics = httpx.get(server.url + "/metrics", headers=admin).text
    assert f'llm_limiter_spend_usd_total{{model="{GPT}",plan="audit"}}' in metrics
    assert "spender" not in metrics   # never a series per user
