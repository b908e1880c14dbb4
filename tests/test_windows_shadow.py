"""Longer windows in the policy (weeks, calendar months, tokens per day, dollars per month)
and shadow mode, from the TOML to the HTTP answer, against the session Valkey."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest
import redis
from click.testing import CliRunner
from flask.testing import FlaskClient
from prometheus_client import REGISTRY

from app import create_app
from limiting.core.ask import Ask
from limiting.core.decision import Decision, GuardRefused
from limiting.core.layers import compile_plan
from limiting.core.llm import Usage
from limiting.core.policy import PolicyError, parse_policy
from limiting.engine import Engine
from limiting.reservation import Reservation
from limiting.stores.storage import open_store
from limiting.stores.store import Store
from limiting.web.cli import limits_cli
from tests.conftest import write_policy
from tests.policies import loaded_toml

PLAN = {"burst": 100, "refill_per_second": 100}


def plan_of(**keys: object):
    return parse_policy({"plans": {"p": {**PLAN, **keys}}}, "t.toml").plans["p"]


def test_week_and_month_quotas_parse() -> None:
    plan = plan_of(quotas=["50 per week", "150 per month", "10 per day"],
                   tokens_per_day=5000, budget_usd_per_month=20)
    compiled = compile_plan(plan, llm=True)
    assert [(x.name, x.kind, x.suffix) for x in compiled.layers] == [
        ("user", "b", "b"), ("quota-week", "w", "q604800"), ("quota-month", "m", "qmonth"),
        ("quota-day", "w", "q86400"), ("tokens-day", "W", "t86400"),
        ("usd-month", "m", "usdmonth")]
    assert compiled.layers[-1].limit == 20_000_000          # micro-dollars
    assert '"quota-week";q=50;w=604800' in compiled.policy_header
    assert plan.meters_units


@pytest.mark.parametrize(("keys", "reason"), [
    ({"quotas": ["5 per 2 months"]}, "plans.p.quotas[0]: '5 per 2 months': a month window is "
                                     "one calendar month"),
    ({"quotas": ["0 per week"]}, "plans.p.quotas[0]: '0 per week' must allow at least 1"),
    ({"quotas": ["5 per fortnight"]}, "plans.p.quotas[0]: '5 per fortnight' is not a rate"),
    ({"quotas": ["5 per month", "9 per month"]}, "plans.p.quotas: two quotas share one window"),
    ({"tokens_per_day": -1}, "plans.p.tokens_per_day: must be a positive number, got -1"),
    ({"budget_usd_per_month": 0}, "plans.p.budget_usd_per_month: must be a positive number"),
    ({"budget_usd_per_month": "20"}, "plans.p.budget_usd_per_month: must be an integer or a "
                                     "number, got str"),
    ({"mode": "dry-run"}, "plans.p.mode: must be one of enforce, shadow, got 'dry-run'"),
    ({"mode": True}, "plans.p.mode: must be a string, not a boolean"),
])
def test_bad_values_name_file_key_and_reason(keys: dict[str, object], reason: str) -> None:
    with pytest.raises(PolicyError) as err:
        plan_of(**keys)
    assert str(err.value).startswith(f"t.toml: {reason}"), str(err.value)


def test_month_budget_needs_prices_and_edge_keeps_flask_limiter_units() -> None:
    with pytest.raises(PolicyError, match=re.escape(
            'models."m".input_usd_per_million: is required while plans.p has '
            "budget_usd_per_month")):
        parse_policy({"plans": {"p": {**PLAN, "budget_usd_per_month": 5}},
                      "models": {"m": {"provider": "openai"}}}, "t.toml")
    with pytest.raises(PolicyError, match=r"edge.per_ip\[0\]: '5 per week' is not a rate"):
        parse_policy({"edge": {"per_ip": ["5 per week"]}, "plans": {"p": PLAN}}, "t.toml")
    with pytest.raises(PolicyError, match=r'models."m".mode: must be one of enforce, shadow'):
        parse_policy({"plans": {"p": PLAN}, "models": {"m": {"provider": "openai",
                                                             "mode": "off"}}}, "t.toml")


def test_check_config_reads_the_new_keys(tmp_path: Path) -> None:
    good = write_policy(tmp_path, '[plans.p]\nburst = 1\nrefill_per_second = 1\nmode = "shadow"\n'
                                  'quotas = ["5 per week", "20 per month"]\n'
                                  "tokens_per_day = 100\n")
    result = CliRunner().invoke(limits_cli, ["check-config", good])
    assert result.exit_code == 0 and "ok (1 plans" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text('[plans.p]\nburst = 1\nrefill_per_second = 1\nquotas = ["5 per 3 months"]\n')
    result = CliRunner().invoke(limits_cli, ["check-config", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}: plans.p.quotas[0]: '5 per 3 months': a month window" in result.output


# --- shadow mode over HTTP ------------------------------------------------------------------------

SHADOW = loaded_toml() + """
[plans.trial]
burst = 50
refill_per_second = 1
quotas = ["2 per day", "500 per month"]
mode = "shadow"
[plans.strict]
burst = 50
refill_per_second = 1
quotas = ["2 per day"]
[users]
"s" = "trial"
"e" = "strict"
"""


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(getattr(record, "event", {}))


@pytest.fixture
def shadow_client(tmp_path: Path, r: redis.Redis, redis_url: str) -> Iterator[FlaskClient]:
    app = create_app({"REDIS_URL": redis_url, "TESTING": True,
                      "LIMITS_CONFIG": write_policy(tmp_path, SHADOW)})
    yield app.test_client()


def would_refuse(layer: str) -> float:
    return REGISTRY.get_sample_value("llm_limiter_would_refuse_total", {"layer": layer}) or 0.0


def test_shadow_plan_never_refuses_but_says_it_would(shadow_client: FlaskClient) -> None:
    lines = Lines()
    log = logging.getLogger("limiter.decisions")
    log.addHandler(lines)
    before = would_refuse("quota-day")
    try:
        answers = [shadow_client.post("/chat", json={"message": "hi", "user_id": "s"})
                   for _ in range(5)]
    finally:
        log.removeHandler(lines)
    assert [a.status_code for a in answers] == [200] * 5
    # The headers are the ones enforcing would send: the day is spent after two.
    assert [a.headers["RateLimit"].split(", ")[1].split(";t=")[0] for a in answers[:3]] == [
        f'"quota-day";r={n}' for n in (1, 0, 0)]
    # Each layer counts what it would admit: the month all five.
    assert '"quota-month";r=495;' in answers[-1].headers["RateLimit"]
    assert 'w=86400, "quota-month";q=500;w=' in answers[0].headers["RateLimit-Policy"]
    assert would_refuse("quota-day") - before == 3
    shadowed = [e for e in lines.events if e.get("event") == "would_refuse"]
    assert [(e["user"], e["layer"], e["over"]) for e in shadowed] == [("s", "quota-day", 1)] * 3
    assert not [e for e in lines.events if e.get("event") == "refused"]


def test_enforcing_plan_still_refuses(shadow_client: FlaskClient) -> None:
    codes = [shadow_client.post("/chat", json={"message": "hi", "user_id": "e"}).status_code
             for _ in range(3)]
    assert codes == [200, 200, 429]


# --- shadow LLM layers and a shadow model guard, at the engine ------------------------------------

LLM = {
    "plans": {"p": {**PLAN, "tokens_per_minute": 100, "tokens_per_day": 1000,
                    "budget_usd_per_month": 1.0, "mode": "shadow"}},
    "models": {"gpt-x": {"provider": "openai", "requests_per_minute": 1, "mode": "shadow",
                         "input_usd_per_million": 1000, "output_usd_per_million": 2000}},
}


@pytest.fixture(params=["redis", "memory"])
def engine(request: pytest.FixtureRequest, r: redis.Redis, redis_url: str) -> Iterator[Engine]:
    store: Store = open_store(redis_url if request.param == "redis" else "memory://")
    yield Engine(store, parse_policy(LLM))
    store.close()


def reserve(engine: Engine, tokens_in: int, tokens_out: int
            ) -> tuple[Decision, Reservation | None, float | None]:
    """(decision, reservation, None), or (decision, None, the guard's wait) when it refused."""
    policy = engine.policy
    ask = Ask("gpt-x", policy.models["gpt-x"], tokens_in, tokens_out)
    try:
        reservation = engine.reserve("u", policy.plans["p"], ask)
    except GuardRefused as exc:
        return exc.decision, None, exc.wait
    return reservation.decision, reservation, None


def left(engine: Engine) -> dict[str, int]:
    return {s.layer.name: s.remaining for s in engine.peek("u").states}


def test_shadow_reservation_charges_and_settles_only_what_it_admitted(engine: Engine) -> None:
    d1, r1, wait = reserve(engine, 30, 50)
    assert d1.allowed and r1 is not None and wait is None and not d1.would_refuse
    # Over tokens-minute and the model's requests per minute: passes, charged in neither.
    d2, r2, wait = reserve(engine, 30, 50)
    assert d2.allowed and r2 is not None and wait is None
    # The guard rides in the same call on one server, in a call of its own on memory://.
    assert sorted(s.layer.name for s in d2.would_refuse) == ["tokens-minute", "upstream-requests"]
    assert [c.layer.name for c in r2.charges] == ["user", "tokens-day", "usd-month"]
    assert r2.guard_charges == []
    assert left(engine)["tokens-minute"] == 20 and left(engine)["tokens-day"] == 840
    r2.settle(Usage(input_tokens=10, output_tokens=10))
    r1.settle(Usage(input_tokens=10, output_tokens=10))
    after = left(engine)
    # r2's settle moved tokens-day (it was charged there), never tokens-minute (it was not).
    assert after["tokens-minute"] == 80 and after["tokens-day"] == 960
    usd_left = engine.policy.plans["p"].budget_usd_per_month * 1e6 - 2 * (10 * 1000 + 10 * 2000)
    assert after["usd-month"] == usd_left


def test_shadow_plan_with_an_enforcing_model_guard(r: redis.Redis, redis_url: str) -> None:
    policy = parse_policy(LLM)
    models = {"gpt-x": replace(policy.models["gpt-x"], mode="enforce")}
    store = open_store(redis_url, timeout=2.0)
    engine = Engine(store, replace(policy, models=MappingProxyType(models)))
    try:
        assert reserve(engine, 1, 1)[1] is not None
        _, reservation, wait = reserve(engine, 1, 1)
        # The guard enforces: refused there, and the plan's layers are given back.
        assert reservation is None and wait is not None and wait > 0
        assert left(engine)["tokens-day"] == 998
    finally:
        store.close()
