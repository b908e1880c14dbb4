"""The audit trail: every key created or revoked and every limits reset is appended to a
capped stream on the real Valkey, with the shell user as actor and never a key; `flask audit
--since` shows it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from app import create_app
from limiting.audit import Audit, parse_since, record, token_actor
from limiting.stores.memory import MemoryStore
from tests.conftest import write_policy
from tests.policies import plan, policy

POLICY = policy(plans={"p": plan(5, 1, "100 per day")})


@pytest.fixture
def app(tmp_path: Path, r: redis.Redis, redis_url: str):
    return create_app({"REDIS_URL": redis_url, "LIMITS_CONFIG": write_policy(tmp_path, POLICY)})


def test_key_and_limit_changes_are_audited(app, r: redis.Redis) -> None:
    runner = app.test_cli_runner()
    created = runner.invoke(args=["keys", "create", "alice", "--plan", "p"])
    assert created.exit_code == 0
    key = created.output.strip().splitlines()[-1]
    assert runner.invoke(args=["limits", "reset", "alice"]).exit_code == 0
    assert runner.invoke(args=["keys", "revoke", key]).exit_code == 0   # by the key itself
    assert runner.invoke(args=["keys", "revoke", key]).exit_code == 1   # nothing changed

    entries = Audit(app.extensions["llm_limiter"].store).read()
    assert [e.action for e in entries] == ["keys.create", "limits.reset", "keys.revoke"]
    key_id = entries[0].subject
    assert entries[2].subject == key_id and (entries[2].before, entries[2].after) == (
        "live", "revoked")
    assert '"user":"alice"' in entries[0].after and entries[1].subject == "u:alice"
    assert all(e.actor.startswith("shell:") for e in entries)
    stream = r.xrange("rl:audit")
    assert len(stream) == 3 and key.encode() not in repr(stream).encode()

    out = runner.invoke(args=["audit", "--since", "1h"])
    assert out.exit_code == 0 and out.output.count("\n") == 3 and key not in out.output
    assert "keys.revoke" in out.output and key_id in out.output
    later = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert "(no entries)" in runner.invoke(args=["audit", "--since", later]).output
    assert runner.invoke(args=["audit", "--since", "yesterday"]).exit_code == 2


def test_the_stream_is_capped_and_memory_keeps_the_same(r: redis.Redis, redis_url: str
                                                        ) -> None:
    from limiting.stores.storage import open_store

    store = open_store(redis_url, timeout=2)
    for i in range(30):
        record(store, token_actor("x" * 40), "admin.action", f"s{i}", {"a": i}, None)
    assert r.xlen("rl:audit") == 30
    assert "x" * 40 not in repr(r.xrange("rl:audit"))
    assert [e.subject for e in Audit(store).read(limit=2)] == ["s28", "s29"]
    mem = MemoryStore()
    record(mem, "shell:me", "limits.set", "bob", {"plan": "a"}, {"plan": "b"})
    (entry,) = Audit(mem).read()
    assert (entry.before, entry.after) == ('{"plan":"a"}', '{"plan":"b"}')


def test_since_reads_durations_and_dates() -> None:
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    assert parse_since("2h", now) == now - timedelta(hours=2)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("2026-02-01", now) == datetime(2026, 2, 1, tzinfo=UTC)
    with pytest.raises(ValueError):
        parse_since("soon", now)
