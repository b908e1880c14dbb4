"""The policy file: the shipped one loads; every mistake names file, key and reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from limiting.core.policy import PolicyError, load_policy, parse_policy
from tests.conftest import ROOT

BASE = "[plans.p]\nburst = 10\nrefill_per_second = 0.5\n"


def test_shipped_policy_is_the_articles_numbers() -> None:
    policy = load_policy(ROOT / "limits.toml")
    starter = policy.resolve("test-user-1")
    assert (starter.burst, starter.refill_per_second) == (10, 0.5)
    assert [(q.amount, q.seconds) for q in starter.quotas] == [(100, 86400)]
    assert policy.plans["pro"].quotas[0].amount == 2000
    assert policy.edge_per_ip == ("20 per 10 seconds",)
    assert policy.resolve("someone-else").name == "starter"


@pytest.mark.parametrize(("text", "message"), [
    ("[plans.p]\nrefill_per_second = 1\n", "plans.p.burst: is required"),
    (BASE + "quotas = ['100 per fortnight']\n", "plans.p.quotas[0]: '100 per fortnight' is not"),
    (BASE + "quotas = [100]\n", "plans.p.quotas[0]: must be a string"),
    (BASE + "quotas = ['1 per day', '5 per day']\n", "plans.p.quotas: two quotas share"),
    (BASE + "burts = 3\n", "plans.p.burts: unknown key"),
    (BASE + "max_concurrent = -1\n", "plans.p.max_concurrent: must be a positive number"),
    (BASE + "fail_quota = 'maybe'\n", "plans.p.fail_quota: must be one of"),
    ("[plans.p]\nburst = true\nrefill_per_second = 1\n", "plans.p.burst: must be an integer"),
    (BASE + "[defaults]\nplan = 'gold'\n", "defaults.plan: names no plan"),
    (BASE + "[users]\n'bob' = 'gold'\n", 'users."bob": names no plan'),
    (BASE + "[edge]\nper_ip = ['lots']\n", "edge.per_ip[0]:"),
    (BASE + "[models.'gpt-4o']\nprovider = 'acme'\n", 'models."gpt-4o".provider: must be one of'),
    (BASE + "[models.m]\nprovider = 'openai'\ninput_usd_per_million = -1\n",
     'models."m".input_usd_per_million: must be a finite number >= 0, got -1'),
    (BASE + "[models.m]\nprovider = 'openai'\noutput_usd_per_million = nan\n",
     'models."m".output_usd_per_million: must be a finite number >= 0, got nan'),
    (BASE + "[models.m]\nprovider = 'openai'\ncached_input_usd_per_million = inf\n",
     'models."m".cached_input_usd_per_million: must be a finite number >= 0, got inf'),
    (BASE + "[models.m]\nprovider = 'anthropic'\nserver_tool_usd_per_use = -0.01\n",
     'models."m".server_tool_usd_per_use: must be a finite number >= 0'),
    (BASE + "[models.m]\nprovider = 'openai'\nservice_tiers = { flex = -0.5 }\n",
     'models."m".service_tiers.flex: must be a positive price multiplier'),
    (BASE + "budget_usd_per_day = 5\n[models.m]\nprovider = 'openai'\n"
     "input_usd_per_million = 1\n",
     'models."m".output_usd_per_million: is required while plans.p has budget_usd_per_day'),
    (BASE + "[models.m]\nprovider = 'openai'\naliases = ['n']\n[models.n]\nprovider = 'openai'\n",
     'models."m".aliases[0]: \'n\' is already a model under [models]'),
    (BASE + "[models.m]\nprovider = 'openai'\naliases = ['m-1']\n"
     "[models.n]\nprovider = 'openai'\naliases = ['m-1']\n",
     'models."n".aliases[0]: \'m-1\' is listed twice (also under models."m")'),
    (BASE + "[models.m]\nprovider = 'openai'\naliases = ['m-1', 'm-1']\n",
     'models."m".aliases[1]: \'m-1\' is listed twice'),
    (BASE + "[models.m]\nprovider = 'openai'\naliases = ['echo']\n",
     'models."m".aliases[0]: \'echo\' is the built-in model'),
    (BASE + "[models.m]\nprovider = 'openai'\naliases = [3]\n",
     'models."m".aliases[0]: must be a model name'),
    ("", "plans: is required"),
    ("[plans\n", "(syntax)"),
])
def test_bad_files_name_file_key_reason(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_missing_file() -> None:
    with pytest.raises(PolicyError, match=r"nope\.toml: \(file\): not found"):
        load_policy("nope.toml")


def test_quota_names_follow_their_window() -> None:
    policy = parse_policy({"plans": {"p": {"burst": 1, "refill_per_second": 1,
                                           "quotas": ["5 per 2 hours", "9 per minute"]}}})
    assert [q.name for q in policy.plans["p"].quotas] == ["quota-7200s", "quota-minute"]


@pytest.mark.slow
def test_check_config_cli(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BASE + "burts = 3\n")
    cmd = [sys.executable, "-m", "flask", "--app", "app", "limits", "check-config"]
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": "memory://"}
    ok = subprocess.run([*cmd, str(ROOT / "limits.toml")], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "ok (2 plans" in ok.stdout
    res = subprocess.run([*cmd, str(bad)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1 and "plans.p.burts: unknown key" in res.stderr


def test_aliases_resolve_to_their_model() -> None:
    policy = parse_policy({
        "plans": {"p": {"burst": 1, "refill_per_second": 1, "budget_usd_per_day": 5}},
        "models": {"gpt-4o": {"provider": "openai", "input_usd_per_million": 2.5,
                              "output_usd_per_million": 10, "aliases": ["gpt-4o-2024-08-06"]},
                   # provider echo bills nothing: it needs no price beside a dollar budget
                   "local": {"provider": "echo"}}})
    model = policy.model("gpt-4o-2024-08-06")
    assert model is policy.models["gpt-4o"] and model.name == "gpt-4o"
    assert policy.model("gpt-4o-2024-05-13") is None and policy.model("echo") is None


def test_shipped_models_are_priced() -> None:
    policy = load_policy(ROOT / "limits.toml")
    assert policy.models
    for name, model in policy.models.items():
        assert model.priced, name
        assert model.requests_per_minute, name


def test_resolve_is_the_one_plan_lookup(caplog: pytest.LogCaptureFixture) -> None:
    policy = parse_policy({"defaults": {"plan": "free"}, "users": {"vip": "pro"},
                           "plans": {"free": {"burst": 1, "refill_per_second": 1},
                                     "pro": {"burst": 9, "refill_per_second": 1}}}, "r.toml")
    assert policy.resolve("anyone").name == "free"           # the default
    assert policy.resolve("vip").name == "pro"               # [users]
    assert policy.resolve("anyone", "pro").name == "pro"     # a key's plan wins
    with caplog.at_level("WARNING", logger="limiter.policy"):
        # A key whose plan left the policy: the user's own, logged once per name.
        assert policy.resolve("vip", "gold").name == "pro"
        assert policy.resolve("anyone", "gold").name == "free"
    assert [rec.getMessage() for rec in caplog.records if "'gold'" in rec.getMessage()] \
        and len(caplog.records) == 1


def test_a_wait_may_not_outlive_a_lease() -> None:
    """A waiter holds its concurrency lease unrenewed while it sleeps: the policy refuses a
    wait as long as the lease's TTL, naming file, key and reason."""
    table = {"plans": {"p": {"burst": 1, "refill_per_second": 1, "max_concurrent": 2,
                             "lease_ttl_seconds": 30, "max_wait_seconds": 30}}}
    with pytest.raises(PolicyError, match=r"plans\.p\.max_wait_seconds: must be under "
                                          r"lease_ttl_seconds \(30\)"):
        parse_policy(table, "limits.toml")
    table["plans"]["p"]["max_wait_seconds"] = 29
    assert parse_policy(table, "limits.toml").plans["p"].max_wait_seconds == 29
