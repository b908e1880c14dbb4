"""`flask --app app spend ...` and `flask --app app audit`: who spent what, and who changed what.

Exit codes as the other commands: 0 done, 1 nothing found (an empty day, an unknown user),
2 bad input or the store unreachable.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime

import click
from flask.cli import AppGroup, with_appcontext

from ..audit import Audit, parse_since
from ..core.naming import KEY_USER
from ..core.policy_sections import valid_tag
from ..ledger import Ledger, Spend, day_text, parse_day
from .keys_cli import _fail, _guarded
from .operated import app_limiter

spend_cli = AppGroup("spend", help="Who spent what: the per-day spend ledger.")


def _ledger() -> Ledger:
    limiter = app_limiter()
    return Ledger(limiter.store, limiter.engine.namespace)


def _row(*cols: object) -> str:
    widths = (26, 10, 12, 12, 12, 14)
    return "".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                   for i, (c, w) in enumerate(zip(cols, widths, strict=False))).rstrip()


def _spend_cols(s: Spend) -> tuple[object, ...]:
    return (s.requests, s.input_tokens + s.cached_input_tokens, s.output_tokens, s.tokens,
            f"{s.usd:.6f}")


HEAD = ("requests", "input", "output", "tokens", "usd")


@spend_cli.command("top")
@click.option("--day", default=None, help="YYYY-MM-DD in UTC (default: today, the store's).")
@click.option("--model", default=None, help="Only what was spent on this model.")
@click.option("--top", "top", default=20, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--by", type=click.Choice(["usd", "tok"]), default="usd", show_default=True,
              help="Rank by dollars or by tokens.")
@click.option("--tag", default=None, metavar="NAME=VALUE",
              help="Only what was spent with keys bearing this tag (ranked by that; the "
                   "columns are each user's whole day).")
def top(day: str | None, model: str | None, top: int, by: str, tag: str | None) -> None:
    """The day's biggest spenders, exact (a /chat user_id is shown as b:ID)."""
    ledger = _ledger()
    if tag is not None and not valid_tag(tag):
        _fail(f"--tag must be a tag like project=search, got {tag!r}", 2)
    if tag is not None and model is not None:
        _fail("--tag and --model are one at a time", 2)
    try:
        number = parse_day(day) if day else _guarded(ledger.today)
    except ValueError:
        _fail(f"--day must be YYYY-MM-DD, got {day!r}", 2)
    rows = _guarded(lambda: ledger.top(number, top, model, by, tag))
    click.echo(f"top spenders of {day_text(number)} (UTC) by {by}"
               + (f", model {model}" if model else "") + (f", tag {tag}" if tag else ""))
    click.echo(_row("user", *HEAD))
    for row in rows:
        name = row.user if row.realm == KEY_USER else f"b:{row.user}"
        score = row.score / 1e6 if by == "usd" else row.score
        click.echo(_row(name, *_spend_cols(row.spend)[:-1], f"{score:.6f}" if by == "usd"
                        else f"{row.spend.usd:.6f}"))
    if tag is not None:
        total = _guarded(lambda: ledger.tag_totals(tag, [number]))[0]
        click.echo(_row(f"tag {tag} total", *_spend_cols(total)))
    if not rows:
        click.echo("(nobody spent anything)")
        sys.exit(1)


@spend_cli.command("user")
@click.argument("user")
@click.option("--days", default=30, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--anonymous/--key-user", "anonymous", default=None,
              help="The /chat body user_id USER, or the API key user USER (default: the key "
                   "user when USER holds a live key, else the /chat user_id).")
def user(user: str, days: int, anonymous: bool | None) -> None:
    """USER's spend per day, oldest first, and the total."""
    limiter = app_limiter()
    ledger = _ledger()
    realm = _guarded(lambda: limiter.realm_of_user(user, anonymous=anonymous))
    span = _guarded(lambda: ledger.days(min(days, limiter.policy.history_days + 1)))
    history = _guarded(lambda: ledger.history(user, realm, span))
    click.echo(f"user {user} ({'API key user' if realm == KEY_USER else '/chat user_id'})")
    click.echo(_row("day", *HEAD))
    for s in history:
        click.echo(_row(day_text(s.day), *_spend_cols(s)))
    total = Spend.sum(history)
    click.echo(_row("total", *_spend_cols(total)))
    if not total.requests:
        sys.exit(1)


@click.command("audit")
@with_appcontext
@click.option("--since", default=None,
              help="Only entries newer than this: 2h, 7d, 30m, or an ISO date/time (UTC).")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100_000))
def audit_command(since: str | None, limit: int) -> None:
    """Who changed what: key creation and revocation, limit changes, admin actions."""
    try:
        after = parse_since(since, datetime.now(UTC)) if since else None
    except ValueError as exc:
        _fail(str(exc), 2)
    entries = _guarded(lambda: Audit(app_limiter().store).read(after, limit))
    for e in entries:
        change = f"  {e.before or '-'} -> {e.after or '-'}" if (e.before or e.after) else ""
        click.echo(f"{e.when}  {e.actor}  {e.action}  {e.subject}{change}")
    if not entries:
        click.echo("(no entries)")

