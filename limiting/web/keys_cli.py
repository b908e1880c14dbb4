"""`flask --app app keys ...`: issue, list and revoke API keys from the server's shell."""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NoReturn, TypeVar

import click
from flask.cli import AppGroup

from ..keys import ApiKeys, KeyRecord, well_formed
from ..stores.store import StoreUnavailable
from .audit_cli import audit_shell
from .operated import app_limiter

T = TypeVar("T")

keys_cli = AppGroup(
    "keys",
    help="Create, list and revoke API keys.\n\n"
    "There is no admin token: whoever can run these commands on the server's shell (and so "
    "reach its store) is the admin. Keep that shell access as guarded as the keys themselves.",
)


def keys_for_app() -> ApiKeys:
    """The ApiKeys of the running app, on its store and plans."""
    return app_limiter().keys


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _guarded(action: Callable[[], T]) -> T:
    """Run against the store; an unreachable one is a message and exit 2, not a traceback."""
    try:
        return action()
    except StoreUnavailable as exc:
        _fail(f"the store is unreachable: {exc}", 2)


def _warn_if_memory() -> None:
    if app_limiter().store.url.startswith("memory:"):
        click.echo("warning: REDIS_URL is memory://, so this key lives only in this process "
                   "and no server will see it", err=True)


@keys_cli.command("create")
@click.argument("user")
@click.option("--plan", default=None, help="Plan of the key (default: [defaults] plan).")
@click.option("--name", default=None, help="A label for operators, e.g. 'ci' or 'laptop'.")
@click.option("--org", default=None,
              help="Org its requests are charged to as well (default: USER's org in [users]).")
@click.option("--tag", "tags", multiple=True, metavar="NAME=VALUE",
              help="A tag the key bears for its life (repeatable), e.g. project=search: its "
                   "requests meet [tags.\"project=search\"] and the ledger counts it.")
def create(user: str, plan: str | None, name: str | None, org: str | None,
           tags: tuple[str, ...]) -> None:
    """Issue a key for USER; the key is printed once, alone on the last line."""
    keys = keys_for_app()
    try:
        key, record = _guarded(lambda: keys.create(user, plan=plan, name=name, org=org,
                                                   tags=tags))
    except ValueError as exc:
        _fail(str(exc), 2)
    _warn_if_memory()
    audit_shell("keys.create", record.key_id, None,
                {"user": record.user, "plan": record.plan, "org": record.org,
                 "name": record.name, "tags": list(record.tags)})
    label = (f"  org {record.org}" if record.org else "") + (
        f"  name {record.name}" if record.name else "") + (
        f"  tags {','.join(record.tags)}" if record.tags else "")
    click.echo(f"created key {record.key_id} for user {record.user}  plan {record.plan}{label}"
               "  (shown once: store it now)")
    click.echo(key)


@keys_cli.command("list")
@click.option("--user", default=None, help="Only this user's keys.")
def list_keys(user: str | None) -> None:
    """Every key by key_id; never the key or its hash."""
    keys = keys_for_app()
    records = _guarded(lambda: keys.list(user))
    rows = [_row(rec) for rec in records]
    header = ("key_id", "user", "plan", "org", "name", "created", "revoked", "tags")
    widths = [max(len(str(col)) for col in column) for column in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        click.echo("  ".join(str(col).ljust(w) for col, w in zip(row, widths, strict=True))
                   .rstrip())
    if not rows:
        click.echo("(no keys)")


@keys_cli.command("revoke")
@click.argument("key_id_or_key")
def revoke(key_id_or_key: str) -> None:
    """Revoke a key by its key_id or the key itself; it stops working at once."""
    keys = keys_for_app()
    key_id = key_id_or_key
    if well_formed(key_id_or_key):   # the key itself: the trail names it by its key_id only
        found = _guarded(lambda: keys.authenticate(key_id_or_key))
        key_id = found.key_id if found is not None else "?"
    count = _guarded(lambda: keys.revoke(key_id_or_key))
    if count == 0:
        _fail("no live key matches (unknown or already revoked)", 1)
    audit_shell("keys.revoke", key_id, "live", "revoked")
    click.echo(f"revoked {count} key(s)")


def _row(rec: KeyRecord) -> tuple[str, ...]:
    created = datetime.fromtimestamp(rec.created_at, UTC).isoformat(timespec="seconds")
    return (rec.key_id, rec.user, rec.plan, rec.org or "-", rec.name or "-", created,
            "yes" if rec.revoked else "no", ",".join(rec.tags) or "-")
