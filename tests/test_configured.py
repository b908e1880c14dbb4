"""Zero configuration (limiting/web/configured.py, limiting/locations.py): where the policy comes
from, in order; a named file that is missing or wrong still fails the start; no REDIS_URL means
memory:// with one log line; the app's folders as gunicorn's master works them out agree with
Flask's own."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from flask import Flask

from limiting import RateLimiter
from limiting.core.policy import PolicyError, parse_policy
from limiting.locations import BUILT_IN_POLICY, module_folders
from limiting.stores.memory import MemoryStore
from limiting.web import configured
from tests.conftest import ROOT


def table(burst: int) -> dict[str, object]:
    """A policy whose one plan's burst tells which source it came from."""
    return {"plans": {"p": {"burst": burst, "refill_per_second": 1}}}


def toml(burst: int) -> str:
    return f"[plans.p]\nburst = {burst}\nrefill_per_second = 1\n"


@pytest.fixture(autouse=True)
def bare_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_URL", "LIMITS_CONFIG", "LIMITER_INSTANCE"):
        monkeypatch.delenv(name, raising=False)


def make_app(folder: Path, **config: object) -> Flask:
    """An app whose root is ``folder`` and whose instance folder no server answers in."""
    app = Flask("zero_config_app", root_path=str(folder), instance_path=str(folder / "instance"))
    app.config.update(config)
    return app


def burst_of(limiter: RateLimiter) -> int:
    return next(iter(limiter.policy.plans.values())).burst


# Each source, from the first in order to the last; each case sets it and every later one.
SOURCES: list[tuple[str, Callable[[Path, pytest.MonkeyPatch, dict[str, object]], None]]] = []


def source(fn: Callable[[Path, pytest.MonkeyPatch, dict[str, object]], None]
           ) -> Callable[[Path, pytest.MonkeyPatch, dict[str, object]], None]:
    SOURCES.append((fn.__name__, fn))
    return fn


@source
def given(folder: Path, mp: pytest.MonkeyPatch, kw: dict[str, object]) -> None:
    kw["policy"] = parse_policy(table(1))


@source
def config_limits(folder: Path, mp: pytest.MonkeyPatch, kw: dict[str, object]) -> None:
    kw.setdefault("config", {})["LIMITS"] = table(2)  # type: ignore[index]


@source
def config_limits_config(folder: Path, mp: pytest.MonkeyPatch, kw: dict[str, object]) -> None:
    (folder / "three.toml").write_text(toml(3))
    kw.setdefault("config", {})["LIMITS_CONFIG"] = str(folder / "three.toml")  # type: ignore[index]


@source
def env_limits_config(folder: Path, mp: pytest.MonkeyPatch, kw: dict[str, object]) -> None:
    (folder / "four.toml").write_text(toml(4))
    mp.setenv("LIMITS_CONFIG", str(folder / "four.toml"))


@source
def root_file(folder: Path, mp: pytest.MonkeyPatch, kw: dict[str, object]) -> None:
    (folder / "limits.toml").write_text(toml(5))


@pytest.mark.parametrize("first", range(len(SOURCES) + 1),
                         ids=[name for name, _ in SOURCES] + ["built_in"])
def test_the_first_source_in_order_wins(first: int, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    kw: dict[str, object] = {}
    for _, setup in SOURCES[first:]:
        setup(tmp_path, monkeypatch, kw)
    app = make_app(tmp_path, **kw.pop("config", {}))  # type: ignore[arg-type]
    limiter = RateLimiter(app, **kw)  # type: ignore[arg-type]
    if first < len(SOURCES):
        assert burst_of(limiter) == first + 1
    else:   # nothing named, no limits.toml: the built-in policy, the article's numbers
        assert limiter.policy.source == str(BUILT_IN_POLICY)
        assert limiter.policy.plans["starter"].burst == 10
        assert limiter.policy.edge_per_ip == ("20 per 10 seconds",)


def test_this_repository_s_limits_toml_is_the_built_in_policy() -> None:
    """One copy of the text: the repo's app and an adopter's get the same default."""
    assert (ROOT / "limits.toml").read_bytes() == BUILT_IN_POLICY.read_bytes()


@pytest.mark.parametrize("where", ["config", "env"])
def test_a_named_file_that_is_missing_fails_the_start(where: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    missing = str(tmp_path / "nope.toml")
    (tmp_path / "limits.toml").write_text(toml(5))   # present, but not what was named
    if where == "env":
        monkeypatch.setenv("LIMITS_CONFIG", missing)
        app = make_app(tmp_path)
    else:
        app = make_app(tmp_path, LIMITS_CONFIG=missing)
    with pytest.raises(PolicyError, match=r"nope\.toml: \(file\): not found"):
        RateLimiter(app)


def test_a_wrong_policy_from_any_source_fails_the_start(tmp_path: Path) -> None:
    (tmp_path / "limits.toml").write_text(toml(3) + "burts = 3\n")
    with pytest.raises(PolicyError, match=r"limits\.toml: plans\.p\.burts: unknown key"):
        RateLimiter(make_app(tmp_path))
    with pytest.raises(PolicyError, match=r'app.config\["LIMITS"\]: plans: is required'):
        RateLimiter(make_app(tmp_path, LIMITS={"edge": {}}))
    with pytest.raises(PolicyError, match=r"must be a dict"):
        RateLimiter(make_app(tmp_path, LIMITS="limits.toml"))


def test_no_redis_url_counts_in_memory_and_says_so_once(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(configured, "_said", [])   # as in a fresh process
    with caplog.at_level(logging.WARNING, logger="limiter.store"):
        first, second = RateLimiter(make_app(tmp_path)), RateLimiter(make_app(tmp_path))
    assert isinstance(first.store, MemoryStore) and isinstance(second.store, MemoryStore)
    said = [r.getMessage() for r in caplog.records if r.name == "limiter.store"]
    assert said == [configured.PER_PROCESS]
    assert "per process (memory://) until REDIS_URL is set" in said[0]


def test_zero_configuration_enforces_a_route_limit(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    limiter = RateLimiter(app)

    @app.get("/ping")
    @limiter.token_bucket(burst=2, per_second=0.001)
    def ping() -> str:
        return "ok"

    client = app.test_client()
    codes = [client.get("/ping").status_code for _ in range(3)]
    assert codes == [200, 200, 429]


def _flask_folders(name: str) -> tuple[Path, Path]:
    app = Flask(name)
    return Path(app.root_path), Path(app.instance_path)


@pytest.mark.parametrize("name", ["shop", "shoppkg", "shoppkg.web.app", "nsroot.app"])
def test_app_folders_from_the_module_spec_agree_with_flask(name: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """gunicorn's master finds the instance folder without importing the app; the CLI and the
    workers use Flask's: they must be one folder, or the CLI misses the embedded store."""
    # Each case's own modules: an earlier case's (another tmp_path), left in sys.modules,
    # would answer in its place (a random order ran "shoppkg.web.app" first).
    for mod in [m for m in sys.modules if m.split(".")[0] in ("shop", "shoppkg", "nsroot")]:
        monkeypatch.delitem(sys.modules, mod)
    (tmp_path / "shop.py").write_text("")
    (tmp_path / "shoppkg" / "web").mkdir(parents=True)
    (tmp_path / "shoppkg" / "__init__.py").write_text("raise RuntimeError('not imported')\n")
    (tmp_path / "shoppkg" / "web" / "__init__.py").write_text("")
    (tmp_path / "shoppkg" / "web" / "app.py").write_text("")
    (tmp_path / "nsroot").mkdir()
    (tmp_path / "nsroot" / "app.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = module_folders(name)     # first: Flask's own way imports the parents
    if name.startswith("shoppkg"):
        (tmp_path / "shoppkg" / "__init__.py").write_text("")
    assert found == _flask_folders(name)


def test_this_repository_s_app_folders() -> None:
    assert module_folders("app") == (ROOT, ROOT / "instance")


def test_the_operator_commands_are_the_groups_the_limiter_adds(tmp_path: Path) -> None:
    """Those commands start (or join) the embedded store without REDIS_URL; others do not."""
    bare = make_app(tmp_path)
    before = set(bare.cli.commands)
    RateLimiter(bare)
    assert set(bare.cli.commands) - before == configured.OPERATOR_COMMANDS


@pytest.mark.parametrize(("argv", "operator"), [
    (["flask", "--app", "yourapp", "limits", "show", "alice"], True),
    (["flask", "-e", ".env", "keys", "list"], True),
    (["flask", "--app", "keys", "run"], False),     # an app named like a group
    (["flask", "--app", "yourapp", "run"], False),
    (["flask", "--app", "yourapp", "routes"], False),
])
def test_an_operator_command_is_told_by_the_command_line(argv: list[str], operator: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", argv)
    with click.Context(click.Command("flask")):
        assert configured.operator_command() is operator
    assert configured.operator_command() is False    # no click command: a server or a test


def test_an_operator_command_waits_longer_for_a_loaded_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    """A request's 50 ms budget is no budget for `flask limits show` on a loaded store (seen:
    'the store is unreachable: Timeout reading from socket' at a load of 30)."""
    app = make_app(tmp_path, REDIS_URL=redis_url)

    def socket_timeout() -> float:
        store = configured.app_store(app, timeout=0.05)
        try:
            return float(store.client.connection_pool.connection_kwargs["socket_timeout"])
        finally:
            store.close()

    assert socket_timeout() == 0.05                       # a server: the request budget
    monkeypatch.setattr(sys, "argv", ["flask", "--app", "yourapp", "limits", "show", "a"])
    with click.Context(click.Command("flask")):
        assert socket_timeout() == configured.OPERATOR_TIMEOUT
