"""The decision metrics by plan, for the per-plan refusal ratio (deploy/prometheus/): each
decision is counted under the plan the request resolved to; an override's plan counts as the
plan it derives from, so no user id ever becomes a label; the edge's per-IP refusals, which
come before any plan, are in none."""

from __future__ import annotations

from pathlib import Path

from flask.testing import FlaskClient

from app import create_app
from limiting import metrics
from tests.conftest import write_policy
from tests.policies import plan, policy

POLICY = policy(per_ip="6 per minute", default="starter",
                plans={"starter": plan(1000, 1000, "2 per day"),
                       "pro": plan(1000, 1000, "2000 per day")})


def decisions(client: FlaskClient) -> list[str]:
    text = client.get("/metrics").get_data(as_text=True)
    return [line for line in text.splitlines()
            if line.startswith("llm_limiter_decisions_total{")]


def test_decisions_are_counted_by_plan_and_never_by_user(tmp_path: Path) -> None:
    app = create_app({"REDIS_URL": "memory://", "LIMITS_CONFIG": write_policy(tmp_path, POLICY),
                      "TESTING": True})
    cli = app.test_cli_runner()
    made = cli.invoke(args=["limits", "set", "secret-user-id-7", "--plan", "pro",
                            "--quota", "1 per day"])
    assert made.exit_code == 0, made.output
    client = app.test_client()
    codes = [client.post("/chat", json={"message": "hi", "user_id": user}).status_code
             for user in ("plain-user", "plain-user", "plain-user",
                          "secret-user-id-7", "secret-user-id-7", "someone", "fresh-user")]
    assert codes == [200, 200, 429, 200, 429, 200, 429]   # the 7th: the edge's, per IP
    lines = decisions(client)
    assert not any("secret-user-id-7" in line or "override" in line for line in lines), lines
    count = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines}
    assert count['llm_limiter_decisions_total{layer="all",outcome="allowed",plan="starter"}'] >= 2
    assert count['llm_limiter_decisions_total{layer="all",outcome="allowed",plan="pro"}'] >= 1
    assert count['llm_limiter_decisions_total{layer="quota-day",outcome="refused",'
                 'plan="starter"}'] >= 1
    assert count['llm_limiter_decisions_total{layer="quota-day",outcome="refused",'
                 'plan="pro"}'] >= 1
    assert count['llm_limiter_decisions_total{layer="edge",outcome="refused",plan=""}'] >= 1


def test_an_override_plan_is_labelled_as_its_own_plan() -> None:
    assert metrics.plan_label("pro+override:u:alice") == "pro"
    assert metrics.plan_label("starter") == "starter" and metrics.plan_label("") == ""
