"""API keys against the real Valkey and memory://: hashing, lookup, listing, revoking, the CLI."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask

from app import create_app
from limiting.core.naming import MAX_USER_ID_LENGTH
from limiting.keys import KEY_ID_LENGTH, KEY_PREFIX, ApiKeys, KeyRecord, bearer_token, new_key
from limiting.stores.storage import open_store
from limiting.stores.store import Store, StoreUnavailable
from limiting.web.keys_cli import keys_cli
from tests.conftest import free_port, write_policy
from tests.policies import STARTER_AND_PRO, policy

PLANS = ("starter", "pro")
POLICY = policy(default="starter", plans=STARTER_AND_PRO)


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "redis":
        request.getfixturevalue("r")  # flushed
        opened = open_store(request.getfixturevalue("redis_url"), timeout=2.0)
    else:
        opened = open_store("memory://")
    yield opened
    opened.close()


@pytest.fixture
def keys(store: Store) -> ApiKeys:
    return ApiKeys(store, "starter", PLANS)


def test_create_then_authenticate(keys: ApiKeys) -> None:
    key, record = keys.create("alice", plan="pro", name="laptop")
    assert key.startswith("llm_") and len(key) == 47
    assert record.key_id == key[4:16] and record.user == "alice" and record.plan == "pro"
    assert record.name == "laptop" and not record.revoked and record.created_at > 0
    assert keys.authenticate(key) == record
    _, default = keys.create("bob")
    assert default.plan == "starter" and default.name is None


def test_unknown_malformed_and_revoked_keys_are_none(keys: ApiKeys) -> None:
    key, record = keys.create("alice")
    for bad in (None, "", "llm_", "sk-" + key[4:], key[:-1] + ("A" if key[-1] != "A" else "B"),
                "llm_" + "a" * 300, key + " ", "llm_é" + key[5:], key.upper()):
        assert keys.authenticate(bad) is None, bad
    assert keys.revoke(record.key_id) == 1
    assert keys.authenticate(key) is None


def test_plan_and_user_validation(keys: ApiKeys) -> None:
    with pytest.raises(ValueError, match=r"'gold'.*starter, pro"):
        keys.create("alice", plan="gold")
    for user in ("", "   ", "x" * (MAX_USER_ID_LENGTH + 1)):
        with pytest.raises(ValueError, match="user id"):
            keys.create(user)
    assert keys.create("x" * MAX_USER_ID_LENGTH)[1].user == "x" * MAX_USER_ID_LENGTH
    assert len(keys.list()) == 1  # refused creates stored nothing


def test_list_and_revoke_by_id_and_by_key(keys: ApiKeys) -> None:
    k1, r1 = keys.create("alice", name="one")
    k2, r2 = keys.create("alice", plan="pro")
    _, r3 = keys.create("bob")
    assert {rec.key_id for rec in keys.list()} == {r1.key_id, r2.key_id, r3.key_id}
    assert {rec.key_id for rec in keys.list("alice")} == {r1.key_id, r2.key_id}
    assert keys.list("nobody") == []
    assert keys.revoke(r1.key_id) == 1
    assert keys.revoke(k2) == 1
    assert keys.revoke(r1.key_id) == 0 and keys.revoke(k2) == 0  # already revoked
    assert keys.revoke("zzzzzzzzzzzz") == 0 and keys.revoke("nonsense") == 0
    assert keys.authenticate(k1) is None and keys.authenticate(k2) is None
    listed = {rec.key_id: rec for rec in keys.list()}
    assert listed[r1.key_id].revoked and listed[r2.key_id].revoked
    assert not listed[r3.key_id].revoked and listed[r1.key_id].name == "one"


def test_records_are_shared_by_instances_on_one_store(store: Store) -> None:
    key, record = ApiKeys(store, "starter", PLANS).create("alice")
    assert ApiKeys(store, "starter", PLANS).authenticate(key) == record


def test_key_record_is_frozen() -> None:
    record = KeyRecord("abc", "u", "starter", None, 1, False)
    with pytest.raises(AttributeError):
        record.user = "v"  # type: ignore[misc]
    assert not hasattr(record, "__dict__")


def _all_stored_bytes(r: redis.Redis) -> list[Any]:
    found: list[Any] = []
    for name in r.scan_iter():
        found.append(name)
        kind = r.type(name)
        if kind == b"hash":
            for field, value in r.hgetall(name).items():
                found += [field, value]
        elif kind == b"string":
            found.append(r.get(name))
        elif kind in (b"set", b"zset", b"list"):
            found += list(r.smembers(name) if kind == b"set" else r.zrange(name, 0, -1)
                          if kind == b"zset" else r.lrange(name, 0, -1))
        else:
            pytest.fail(f"unexpected key type {kind!r} at {name!r}")
    return found


@pytest.fixture
def redis_keys(r: redis.Redis, redis_url: str) -> Iterator[ApiKeys]:
    store = open_store(redis_url, timeout=2.0)
    yield ApiKeys(store, "starter", PLANS)
    store.close()


def test_only_the_hash_is_stored_under_cluster_safe_keys(r: redis.Redis, redis_keys: ApiKeys
                                                         ) -> None:
    keys = redis_keys
    key, record = keys.create("alice")
    keys.revoke(record.key_id)
    hexd = hashlib.sha256(key.encode()).hexdigest()
    stored = _all_stored_bytes(r)
    assert not any(key.encode() in blob or key[4:].encode() in blob for blob in stored)
    assert sorted(r.keys()) == [f"rl:key:{{{hexd}}}".encode(), b"rl:keys:index"]
    assert r.hget(f"rl:key:{{{hexd}}}", "hash") == hexd.encode()
    assert r.hgetall("rl:keys:index") == {record.key_id.encode(): hexd.encode()}


def _commands(r: redis.Redis) -> int:
    """Commands clients sent (the HGETALL inside lua/key.lua is part of its EVALSHA)."""
    stats = r.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items()
               if not k.startswith(("cmdstat_info", "cmdstat_config", "cmdstat_hgetall")))


def test_authenticate_is_one_store_round_trip(r: redis.Redis, redis_keys: ApiKeys) -> None:
    keys = redis_keys
    key, _ = keys.create("alice")
    keys.authenticate(key)  # the pool's connection is made (and greeted) here, not below
    for presented, expected in ((key, 1), ("llm_" + "x" * 43, 1), ("sk-nope", 0),
                                ("llm_" + "x" * 300, 0), (None, 0)):
        r.config_resetstat()
        keys.authenticate(presented)
        assert _commands(r) == expected, presented
        if expected:
            assert r.info("commandstats")["cmdstat_hgetall"]["calls"] == 1


def test_unreachable_store_raises_store_unavailable() -> None:
    keys = ApiKeys(open_store(f"redis://127.0.0.1:{free_port()}"), "starter", PLANS)
    with pytest.raises(StoreUnavailable):
        keys.authenticate("llm_" + "x" * 43)
    with pytest.raises(StoreUnavailable):
        keys.create("alice")
    assert keys.authenticate("not-a-key") is None  # still never reaches the store


@pytest.mark.parametrize("header, token", [
    ("Bearer llm_abc", "llm_abc"), ("bearer   llm_abc  ", "llm_abc"), ("BEARER llm_abc", "llm_abc"),
    (None, None), ("", None), ("Bearer", None), ("Bearer  ", None), ("Basic llm_abc", None),
    ("Bearer a b", None), ("llm_abc", None),
])
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


@pytest.fixture(params=["redis", "memory"])
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Flask:
    if request.param == "redis":
        request.getfixturevalue("r")
        url = request.getfixturevalue("redis_url")
    else:
        url = "memory://"
    created = create_app({"REDIS_URL": url, "LIMITS_CONFIG": write_policy(tmp_path, POLICY),
                          "TESTING": True})
    if "keys" not in created.cli.commands:
        created.cli.add_command(keys_cli)
    return created


def _keys(app: Flask) -> ApiKeys:
    limiter = app.extensions["llm_limiter"]
    return ApiKeys(limiter.store, limiter.policy.default_plan, limiter.policy.plans)


def test_cli_create_list_revoke(app: Flask) -> None:
    runner = app.test_cli_runner()
    made = runner.invoke(args=["keys", "create", "alice", "--plan", "pro", "--name", "ci"])
    assert made.exit_code == 0, made.output
    lines = made.stdout.strip().splitlines()
    key = lines[-1]
    assert key.startswith("llm_") and len(key) == 47 and key.strip() == key
    assert "alice" in lines[0] and "pro" in lines[0] and key[4:16] in lines[0]
    record = _keys(app).authenticate(key)
    assert record is not None and record.user == "alice" and record.plan == "pro"

    listed = runner.invoke(args=["keys", "list"])
    assert listed.exit_code == 0
    hexd = hashlib.sha256(key.encode()).hexdigest()
    assert key not in listed.output and key[4:] not in listed.output and hexd not in listed.output
    assert record.key_id in listed.output and "ci" in listed.output
    only_bob = runner.invoke(args=["keys", "list", "--user", "bob"])
    assert record.key_id not in only_bob.output

    gone = runner.invoke(args=["keys", "revoke", record.key_id])
    assert gone.exit_code == 0 and "revoked 1 key(s)" in gone.stdout
    assert _keys(app).authenticate(key) is None
    again = runner.invoke(args=["keys", "revoke", record.key_id])
    assert again.exit_code == 1 and "error" in again.stderr
    assert "yes" in runner.invoke(args=["keys", "list", "--user", "alice"]).stdout

    second = runner.invoke(args=["keys", "create", "bob"]).stdout.strip().splitlines()[-1]
    assert runner.invoke(args=["keys", "revoke", second]).exit_code == 0
    assert _keys(app).authenticate(second) is None


def test_cli_warns_that_a_memory_key_lives_in_this_process_only(app: Flask) -> None:
    made = app.test_cli_runner().invoke(args=["keys", "create", "alice"])
    assert made.exit_code == 0, made.output
    memory = app.extensions["llm_limiter"].store.url == "memory://"
    assert ("lives only in this process" in made.stderr) is memory


def test_cli_errors(app: Flask) -> None:
    runner = app.test_cli_runner()
    bad = runner.invoke(args=["keys", "create", "alice", "--plan", "gold"])
    assert bad.exit_code == 2 and "gold" in bad.stderr and "starter" in bad.stderr
    assert bad.stdout == ""
    assert runner.invoke(args=["keys", "revoke", "nosuchkeyid0"]).exit_code == 1
    assert "keys" in runner.invoke(args=["keys", "--help"]).output
    assert "shell" in runner.invoke(args=["keys", "--help"]).output


def test_cli_unreachable_store_exits_2_without_traceback(tmp_path: Path) -> None:
    app = create_app({"REDIS_URL": f"redis://127.0.0.1:{free_port()}",
                      "LIMITS_CONFIG": write_policy(tmp_path, POLICY), "TESTING": True})
    if "keys" not in app.cli.commands:
        app.cli.add_command(keys_cli)
    runner = app.test_cli_runner()
    for args in (["create", "alice"], ["list"], ["revoke", "abcdefghijkl"]):
        result = runner.invoke(args=["keys", *args])
        assert result.exit_code == 2, (args, result.output)
        assert "unreachable" in result.stderr and "Traceback" not in result.output
        assert not isinstance(result.exception, StoreUnavailable)


def test_a_key_id_never_reads_as_a_command_line_option() -> None:
    # `flask keys revoke <id>`: an id starting with "-" was read as an option (exit 2), and
    # 1 key in 64 drew one. 5,000 draws would have held ~78 of them.
    ids = [new_key()[len(KEY_PREFIX):][:KEY_ID_LENGTH] for _ in range(5000)]
    assert not [i for i in ids if i.startswith("-")]
    assert any("-" in i for i in ids)   # the character itself stays in the alphabet
