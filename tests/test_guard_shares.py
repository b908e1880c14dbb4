"""Capacity kept for the plans that paid: ``[models."…"] reserve = { pro = 0.2 }``.

Other plans are refused by the model's guard once its windows reach 80 %; pro may use all of
it. Every plan's usage counts in the one window; only the limit each plan is checked with
differs. Through the engine, the Flask test client (/chat) and the real openai SDK (/v1)
against the local fake provider.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest
import redis
from click.testing import CliRunner

from app import create_app
from fakeprovider import FakeProvider
from limiting.core.ask import Ask
from limiting.core.decision import GuardRefused
from limiting.core.policy import OVERRIDDEN, Plan, Policy, PolicyError, parse_policy
from limiting.engine import Engine
from limiting.providers import clients
from limiting.stores.storage import open_store
from limiting.web.cli import limits_cli
from tests.conftest import write_policy
from tests.policies import LOADED, plan, policy, served_by

BIG = plan(1000, 100, "10000 per day")
PLANS = {"starter": BIG, "pro": BIG, "team": BIG}
MODEL = "gpt-4o"


def _policy(**model: object) -> Policy:
    return parse_policy({"plans": PLANS, "models": {MODEL: {"provider": "openai", **model}}},
                        "t.toml")


def _engine(redis_url: str, pol: Policy) -> Engine:
    return Engine(open_store(redis_url, timeout=2.0), pol)


def _take(engine: Engine, pol: Policy, plan: Plan, user: str, n: int) -> list[float | None]:
    """``n`` requests of ``user`` on ``plan``: the guard's wait for each one refused."""
    refused = []
    for _ in range(n):
        try:
            engine.reserve(user, plan, Ask(MODEL, pol.models[MODEL], 5, 5))
        except GuardRefused as exc:
            refused.append(exc.wait)
    return refused


# --- the policy file ---------------------------------------------------------------------------

@pytest.mark.parametrize(("reserve", "reason"), [
    ({"gold": 0.2}, r'models."gpt-4o".reserve.gold: names no plan under \[plans\]'),
    ({"pro": 0}, r"reserve.pro: must be a share between 0 and 1"),
    ({"pro": 1}, r"reserve.pro: must be a share between 0 and 1"),
    ({"pro": -0.1}, r"reserve.pro: must be a share between 0 and 1"),
    ({"pro": True}, r"reserve.pro: must be a share between 0 and 1"),
    ({"pro": "20%"}, r"reserve.pro: must be a share between 0 and 1"),
    ({"pro": float("nan")}, r"reserve.pro: must be a share between 0 and 1"),
    ({"pro": 0.6, "team": 0.4}, r"reserve: the shares sum to 1; they must sum to less than 1"),
])
def test_bad_shares_fail_with_file_key_and_reason(reserve: dict[str, object],
                                                  reason: str) -> None:
    with pytest.raises(PolicyError, match=reason):
        _policy(requests_per_minute=10, reserve=reserve)
    with pytest.raises(PolicyError, match=r'models."gpt-4o".reserve: must be a table'):
        _policy(requests_per_minute=10, reserve=0.2)


def test_check_config_reads_the_shares(tmp_path: Path) -> None:
    text = policy(plans=PLANS, models={MODEL: served_by("openai", requests_per_minute=10,
                                                        reserve={"pro": 0.2, "team": 0.1})})
    result = CliRunner().invoke(limits_cli, ["check-config", write_policy(tmp_path, text)])
    assert result.exit_code == 0, result.output
    bad = write_policy(tmp_path, text.replace("team = 0.1", "team = 0.8"))
    result = CliRunner().invoke(limits_cli, ["check-config", bad])
    assert result.exit_code == 1
    assert 'models."gpt-4o".reserve: the shares sum to 1' in result.output


# --- the engine ----------------------------------------------------------------------------------

def test_starter_gets_8_of_10_then_pro_the_last_2(r: redis.Redis, redis_url: str) -> None:
    pol = _policy(requests_per_minute=10, reserve={"pro": 0.2})
    engine = _engine(redis_url, pol)
    waits = _take(engine, pol, pol.plans["starter"], "s1", 9)
    assert len(waits) == 1   # the 9th: the window holds 8 of 10, the rest is pro's
    # Honest: the time until the window has room below the starter's ceiling (a minute,
    # as all 8 were charged in this slot), never "no wait helps".
    assert waits[0] is not None and 50 < waits[0] <= 61
    pro_waits = _take(engine, pol, pol.plans["pro"], "p1", 3)
    assert len(pro_waits) == 1 and pro_waits[0] is not None and 50 < pro_waits[0] <= 61
    # Every plan's usage counts in the one window: it holds 10, and nobody gets more.
    assert engine.peek_model(MODEL).states[0].remaining == 0
    assert len(_take(engine, pol, pol.plans["starter"], "s2", 2)) == 2


def test_pro_may_fill_the_whole_window(r: redis.Redis, redis_url: str) -> None:
    pol = _policy(requests_per_minute=10, tokens_per_minute=1000, reserve={"pro": 0.2})
    engine = _engine(redis_url, pol)
    assert _take(engine, pol, pol.plans["pro"], "p", 10) == []
    assert len(_take(engine, pol, pol.plans["starter"], "s", 1)) == 1


def test_several_plans_hold_shares(r: redis.Redis, redis_url: str) -> None:
    pol = _policy(requests_per_minute=10, reserve={"pro": 0.2, "team": 0.1})
    engine = _engine(redis_url, pol)
    # starter stops at 70 %, team at 80 % (pro's share kept), pro at 90 % (team's kept).
    assert len(_take(engine, pol, pol.plans["starter"], "s", 8)) == 1
    assert len(_take(engine, pol, pol.plans["team"], "t", 2)) == 1
    assert len(_take(engine, pol, pol.plans["pro"], "p", 2)) == 1
    assert len(_take(engine, pol, pol.plans["team"], "t", 1)) == 1


def test_the_token_window_keeps_the_share_too(r: redis.Redis, redis_url: str) -> None:
    pol = _policy(tokens_per_minute=100, reserve={"pro": 0.2})
    engine = _engine(redis_url, pol)
    # 10 tokens a request (5 in, 5 out): 8 for starter, the last 2 for pro.
    assert len(_take(engine, pol, pol.plans["starter"], "s", 9)) == 1
    assert _take(engine, pol, pol.plans["pro"], "p", 2) == []


def test_an_overridden_plan_keeps_its_plans_share(r: redis.Redis, redis_url: str) -> None:
    pol = _policy(requests_per_minute=10, reserve={"pro": 0.2})
    engine = _engine(redis_url, pol)
    _take(engine, pol, pol.plans["starter"], "s", 8)
    overridden = replace(pol.plans["pro"], name=f"pro{OVERRIDDEN}u:alice")
    assert _take(engine, pol, overridden, "alice", 2) == []
    # A plan merely named like a holder is not one.
    fake = replace(pol.plans["starter"], name="pro-ish")
    assert len(_take(engine, pol, fake, "x", 1)) == 1


# --- over HTTP: the Flask test client and the real openai SDK -------------------------------------

@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProvider]:
    with FakeProvider() as fp:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-fake")
        monkeypatch.setenv("OPENAI_BASE_URL", fp.url + "/v1")
        monkeypatch.setenv("UPSTREAM_TIMEOUT", "5")
        clients.reset()
        yield fp
    clients.reset()


@pytest.mark.parametrize("face", ["chat", "openai-sdk"])
def test_over_http_starter_gets_8_then_pro_the_last_2(
        face: str, tmp_path: Path, r: redis.Redis, redis_url: str, fake: FakeProvider) -> None:
    text = policy(store=LOADED, per_ip="100000 per 10 seconds", default="starter",
                  plans={"starter": BIG, "pro": BIG},
                  models={MODEL: served_by("openai", requests_per_minute=10,
                                           reserve={"pro": 0.2})})
    app = create_app({"REDIS_URL": redis_url, "REQUIRE_API_KEY": "1",
                      "LIMITS_CONFIG": write_policy(tmp_path, text)})
    keys = app.extensions["llm_limiter"].keys
    starter, pro = keys.create("sam", "starter")[0], keys.create("pat", "pro")[0]
    http = httpx.Client(transport=httpx.WSGITransport(app=app))

    def sdk(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url="http://app/v1", api_key=key, max_retries=0,
                             http_client=http)

    def call(key: str) -> tuple[int, dict[str, object], str | None]:
        """One request: status, JSON error body (empty on success), Retry-After."""
        if face == "chat":
            res = app.test_client().post("/chat", json={"message": "hi", "model": MODEL},
                                         headers={"Authorization": f"Bearer {key}"})
            body = res.get_json() if res.status_code != 200 else {}
            return res.status_code, body, res.headers.get("Retry-After")
        try:
            sdk(key).chat.completions.create(model=MODEL, max_tokens=5,
                                             messages=[{"role": "user", "content": "hi"}])
            return 200, {}, None
        except openai.APIStatusError as exc:
            return exc.status_code, exc.response.json(), exc.response.headers.get("Retry-After")

    assert [call(starter)[0] for _ in range(8)] == [200] * 8
    status, body, retry = call(starter)
    assert status in (429, 503) and "upstream_saturated" in str(body), body
    assert retry is not None and 50 < int(retry) <= 61
    assert [call(pro)[0] for _ in range(2)] == [200, 200]
    assert call(pro)[0] in (429, 503)
    assert len(fake.requests) == 10   # the provider saw exactly the admitted ones
