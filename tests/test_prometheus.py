"""deploy/prometheus/ and deploy/grafana/ checked by the real tools: promtool checks the rules
and runs their unit tests (one per alert), and a real Prometheus (Debian's) scrapes the app
under gunicorn with 4 workers while a short load runs, then answers every recording rule and
every dashboard panel's query, and the counters it sums across workers match the load."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
import yaml

from tests.conftest import ROOT, free_port, keyed_app, wait_http
from tests.policies import LOADED, plan, policy, served_by

RULES = ROOT / "deploy" / "prometheus" / "llm-limiter.rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "llm-limiter.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "llm-limiter.json"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
WAIT = 90.0    # a deadline for every wait below, not a timing assert

PRICES = {"input_usd_per_million": 0.15, "output_usd_per_million": 0.6}
USERS = {"alice": "roomy", "tiny": "tiny", "patient": "patient", "watched": "watched"}
POLICY = policy(
    store=LOADED, per_ip="100000 per 10 seconds", default="roomy",
    plans={"roomy": plan(500, 50, "10000 per day", tokens_per_minute=100000, max_concurrent=4,
                         default_max_tokens=50, max_wait_seconds=0, budget_usd_per_day=100),
           "tiny": plan(2, 0.01, max_wait_seconds=0),
           "patient": plan(1, 1, max_wait_seconds=5),   # its second call in a row waits
           "watched": plan(1, 0.01, mode="shadow")},
    users=USERS,
    models={"gpt-4o-mini": served_by("openai", requests_per_minute=100000, **PRICES),
            "gpt-saturated": served_by("openai", requests_per_minute=1, **PRICES)})
HELLO = [{"role": "user", "content": "hello big world"}]
# Panel queries on failures only (a store error, a fail policy): none in a healthy run.
NO_DATA_EXPECTED = ("llm_limiter_store_errors_total", "llm_limiter_fail_policy_total")


def dashboard_exprs() -> list[str]:
    """Every target's expr of every panel, Grafana's interval variables substituted."""
    model = json.loads(DASHBOARD.read_text())
    return [re.sub(r"\$__(rate_)?interval", "1m", target["expr"])
            for panel in model["panels"] for target in panel["targets"]]


def recorded_names() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return sorted({rule["record"] for group in groups for rule in group["rules"]
                   if "record" in rule})


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    for args in (["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]):
        done = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120,
                              cwd=RULES.parent)
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_unit_test() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert alerts and alerts == tested


def test_dashboard_reads_its_datasource_from_a_variable() -> None:
    model = json.loads(DASHBOARD.read_text())
    assert [v["name"] for v in model["templating"]["list"]] == ["DS_PROMETHEUS"]
    for panel in model["panels"]:
        assert panel["targets"] and panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert all(t["datasource"]["uid"] == "${DS_PROMETHEUS}" for t in panel["targets"])


class Prometheus:
    """Debian's Prometheus on a free loopback port, its own storage, scraping ``target``."""

    def __init__(self, folder: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = folder / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "llm-limiter", "static_configs": [
                {"targets": [target]}]}]}))
        self.log = open(folder / "prometheus.log", "wb")   # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = httpx.get(self.url + "/api/v1/query", params={"query": expr}).json()
        assert answer["status"] == "success", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def until(self, expr: str, ok: Any) -> list[dict[str, Any]]:
        """``expr``'s result once ``ok(result)`` holds (or the last one, at the deadline)."""
        deadline = time.monotonic() + WAIT
        while True:
            result = self.query(expr)
            if ok(result) or time.monotonic() > deadline:
                return result
            time.sleep(0.5)

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=5)
        finally:
            self.log.close()


@pytest.fixture
def prometheus_stack(tmp_path: Path, redis_url: str) -> Iterator[tuple[Any, Prometheus, dict]]:
    redis.Redis.from_url(redis_url).flushall()
    (tmp_path / "limits.toml").write_text(POLICY)
    env = {"REDIS_URL": redis_url, "LIMITS_CONFIG": str(tmp_path / "limits.toml")}
    with keyed_app(tmp_path, env, USERS, workers=4) as (server, _fp, keys):
        prom = Prometheus(tmp_path, server.url.removeprefix("http://"))
        try:
            wait_http(prom.url + "/-/ready", proc=prom.proc)
            up = prom.until('up{job="llm-limiter"}',
                            lambda r: bool(r) and r[0]["value"][1] == "1")
            assert up and up[0]["value"][1] == "1", up
            yield server, prom, keys
        finally:
            prom.stop()


def run_load(url: str, keys: dict[str, str]) -> dict[str, int]:
    """A short bounded load: admitted calls plain and streamed, refusals by a plan's layers and
    by a model's guard, waits, and a shadow layer's would-refuse. Counts what the client saw."""
    seen = {"admitted": 0, "refused": 0}
    clients = {user: openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0,
                                   timeout=60) for user, key in keys.items()}

    def call(user: str, model: str = "gpt-4o-mini", stream: bool = False) -> None:
        try:
            if stream:
                chunks = clients[user].chat.completions.create(
                    model=model, messages=HELLO, stream=True,  # type: ignore[arg-type]
                    stream_options={"include_usage": True})
                assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                clients[user].chat.completions.create(model=model, messages=HELLO)  # type: ignore[arg-type]
            seen["admitted"] += 1
        except openai.RateLimitError:
            seen["refused"] += 1
            by_plan = f"refused:{USERS[user]}"
            seen[by_plan] = seen.get(by_plan, 0) + 1

    try:
        for _ in range(4):   # spread over a few scrapes, so every rate has two samples
            for stream in (False, True, False):
                call("alice", stream=stream)
            call("tiny")
            call("patient")
            call("patient")
            call("watched")
            time.sleep(1.0)
        call("alice", "gpt-saturated")
        call("alice", "gpt-saturated")
    finally:
        for client in clients.values():
            client.close()
    return seen


@pytest.mark.slow
def test_a_real_prometheus_answers_every_rule_and_panel(prometheus_stack: Any) -> None:
    server, prom, keys = prometheus_stack
    seen = run_load(server.url, keys)
    # tiny: 2 of its 4 admitted; alice's second call to the saturated model: the guard's.
    assert seen["refused"] >= 3, seen
    admitted = seen["admitted"]

    # Summed over the 4 workers' files, as Prometheus scraped them.
    total = 'sum(llm_limiter_decisions_total{layer="all",outcome="allowed"})'
    result = prom.until(total, lambda r: bool(r) and float(r[0]["value"][1]) >= admitted)
    assert result and float(result[0]["value"][1]) == admitted, (result, seen)
    refused = prom.until('sum(llm_limiter_decisions_total{outcome="refused"})',
                         lambda r: bool(r) and float(r[0]["value"][1]) >= seen["refused"])
    assert refused and float(refused[0]["value"][1]) == seen["refused"], (refused, seen)
    # By plan, for the per-plan refusal ratio: every refusal of this load under its user's plan.
    by_plan = {f"refused:{r['metric']['plan']}": float(r["value"][1]) for r in prom.until(
        'sum by (plan) (llm_limiter_decisions_total{outcome="refused"})',
        lambda r: sum(float(x["value"][1]) for x in r) >= seen["refused"])}
    assert by_plan == {k: float(v) for k, v in seen.items() if k.startswith("refused:")}, (
        by_plan, seen)

    for name in recorded_names():
        result = prom.until(name, bool)
        assert result, f"recording rule {name} has no data"
    rules = httpx.get(prom.url + "/api/v1/rules").json()["data"]["groups"]
    assert all(rule["health"] == "ok" for group in rules for rule in group["rules"]), rules

    for expr in dashboard_exprs():
        if any(name in expr for name in NO_DATA_EXPECTED):
            prom.query(expr)   # answers without error, empty in a healthy run
            continue
        assert prom.until(expr, bool), f"dashboard query has no data: {expr}"
