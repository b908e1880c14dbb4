"""Alert crossings and webhook signatures (limiting/core/alerting.py), and the policy keys
that ask for them."""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from limiting.core.alerting import Used, body_of, crossings, signature, verify
from limiting.core.policy import PolicyError, parse_policy

DEFAULT_POLICY = Path(__file__).parent.parent / "limiting" / "default_limits.toml"


def used(remaining: float, cost: float, limit: float = 100, kind: str = "w") -> Used:
    return Used("quota-day", kind, limit, 86_400, remaining, cost, 3600.0)


def test_a_decision_crosses_each_threshold_it_steps_over_once() -> None:
    # 79 used, this request adds 2: 81 crosses 0.8, not 1.0.
    found = crossings("alice", "user", [used(19, 2)], (0.8, 1.0), now=1_000_000.0)
    assert [(c.threshold, c.used, c.limit) for c in found] == [(0.8, 81, 100)]
    c = found[0]
    assert c.resets_at == 1_003_600 and c.window_id == 1_000_000 // 86_400
    # Landing exactly on the mark crosses it; starting on it does not cross again.
    assert [c.threshold for c in crossings("a", "user", [used(20, 1)], (0.8,), 0)] == [0.8]
    assert crossings("a", "user", [used(19, 1)], (0.8,), 0) == []
    # One large request can step over both.
    assert [c.threshold for c in crossings("a", "user", [used(0, 30)], (0.8, 1.0), 0)] \
        == [0.8, 1.0]


def test_buckets_leases_and_requests_that_add_nothing_never_alert() -> None:
    assert crossings("a", "user", [used(0, 30, kind="b")], (0.8,), 0) == []
    assert crossings("a", "user", [used(0, 30, kind="c")], (0.8,), 0) == []
    assert crossings("a", "user", [used(0, 0)], (0.8,), 0) == []


@given(st.lists(st.integers(0, 40), min_size=1, max_size=60),
       st.lists(st.sampled_from([0.5, 0.8, 0.9, 1.0]), min_size=1, max_size=4, unique=True))
def test_a_run_of_charges_crosses_each_threshold_at_most_once(costs: list[int],
                                                              thresholds: list[float]) -> None:
    limit, total, seen = 100, 0, []
    for cost in costs:
        if total + cost > limit:
            continue   # the script refuses it: nothing charged, nothing crossed
        total += cost
        seen += crossings("a", "user", [used(limit - total, cost)], sorted(thresholds), 0)
    marks = [c.threshold for c in seen]
    assert len(marks) == len(set(marks))
    assert set(marks) == {t for t in thresholds if total >= t * limit}


def test_the_event_id_is_the_crossings_and_the_same_in_every_worker() -> None:
    a = crossings("alice", "user", [used(19, 2)], (0.8,), now=5.0)[0]
    b = crossings("alice", "user", [used(10, 11)], (0.8,), now=50.0)[0]
    assert a.event_id == b.event_id   # same subject, layer, threshold and window
    other = crossings("alice", "key", [used(19, 2)], (0.8,), now=5.0)[0]
    assert other.event_id != a.event_id
    event = a.event()
    assert set(event) == {"id", "type", "subject", "realm", "layer", "threshold", "used",
                          "limit", "resets_at"}
    assert event["type"] == "limit.threshold"


def test_signature_is_stripe_style_and_a_receiver_checks_it() -> None:
    body = body_of({"id": "evt_1", "subject": "alice\u2028\"x\""})
    header = signature(body, "whsec", 1_700_000_000)
    t, v1 = header.split(",")
    expected = hmac.new(b"whsec", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert t == "t=1700000000" and v1 == f"v1={expected}"
    assert verify(header, body, "whsec", now=1_700_000_100)
    assert not verify(header, body + b" ", "whsec", now=1_700_000_100)
    assert not verify(header, body, "other", now=1_700_000_100)
    assert not verify(header, body, "whsec", now=1_700_001_000)   # an old replay
    for bad in ("", "t=x,v1=00", "v1=" + expected, "garbage"):
        assert not verify(bad, body, "whsec", now=1_700_000_000)


def test_alert_policy_keys_are_checked() -> None:
    base = tomllib.loads(DEFAULT_POLICY.read_text())
    plan = next(iter(base["plans"]))
    base["plans"][plan]["alert_at"] = [1.0, 0.8, 0.8]
    base["alerts"] = {"webhook_url": "https://hooks.example/limits"}
    policy = parse_policy(base)
    assert policy.plans[plan].alert_at == (0.8, 1.0)
    assert policy.alert_webhook_url == "https://hooks.example/limits"
    for bad_at in ([0], [1.5], ["0.8"], [True], 0.8):
        base["plans"][plan]["alert_at"] = bad_at
        with pytest.raises(PolicyError, match="alert_at"):
            parse_policy(base)
    base["plans"][plan]["alert_at"] = [0.8]
    for bad_alerts in ({"webhook_url": "ftp://x"}, {"webhook": "https://x"}):
        base["alerts"] = bad_alerts
        with pytest.raises(PolicyError, match="alerts"):
            parse_policy(base)


def test_end_user_and_tag_tables_are_read_as_layers_and_checked() -> None:
    base = tomllib.loads(DEFAULT_POLICY.read_text())
    plan = next(iter(base["plans"]))
    base["plans"][plan]["end_user"] = {"quotas": ["20 per day"], "tokens_per_minute": 500}
    base["tags"] = {"project=search": {"budget_usd_per_day": 5, "quotas": ["100 per hour"]}}
    policy = parse_policy(base)
    end_user = policy.plans[plan].end_user
    assert end_user is not None and end_user.tokens_per_minute == 500
    assert end_user.burst == 0 and end_user.quotas[0].amount == 20
    assert policy.tags["project=search"].budget_usd_per_day == 5
    for bad in ({"nope": {"quotas": ["1 per day"]}}, {"a=b c": {}}, {"=x": {}}):
        with pytest.raises(PolicyError, match="tags"):
            parse_policy({**base, "tags": bad})
    base["plans"][plan]["end_user"] = {"tokens_per_minut": 5}
    with pytest.raises(PolicyError, match="end_user"):
        parse_policy(base)
