"""`flask --app app limits ...`: look at, reset and override a user's limits from the shell."""

from __future__ import annotations

import json
import math
import sys
from datetime import UTC, datetime
from pathlib import Path

import click
from flask import current_app
from flask.cli import AppGroup

from ..core.layers import compile_plan
from ..core.naming import BODY_USER, KEY_USER
from ..core.orgs import compile_org
from ..core.override import Override, check, parse_duration
from ..core.policy import Plan, PolicyError, load_policy
from ..core.routes import unknown_endpoints
from ..overrides import REFRESH_SECONDS, OverrideTable, StoreOverrides
from ..stores.store import StoreUnavailable
from .audit_cli import audit_shell
from .keys_cli import _fail, _guarded  # one way to fail a command, for both groups
from .operated import app_limiter

limits_cli = AppGroup("limits", help="Inspect and reset rate limits.")


_WHO = click.option(
    "--anonymous/--key-user", "anonymous", default=None,
    help="The /chat body user_id USER, or the API key user USER (default: the key user when "
         "USER holds a live key, else the /chat user_id): the two never share limits.")


_ORG = click.option("--org", "org_name", default=None,
                    help="An org under [orgs] (its key holders' layers; with --anonymous its "
                         "/chat user_ids').")


_TAG = click.option("--tag", "tag_name", default=None, metavar="NAME=VALUE",
                    help="A tag under [tags] (shared by every API key bearing it).")


def _tag(name: str) -> Plan:
    tag = app_limiter().policy.tags.get(name)
    if tag is None:
        _fail(f"no tag {name!r} under [tags]", 2)
    return tag


def _one_subject(user: str | None, org_name: str | None, tag_name: str | None) -> None:
    if sum(x is not None for x in (user, org_name, tag_name)) != 1:
        _fail("name a USER, an --org or a --tag (one of them)", 2)


def _org(name: str) -> Plan:
    org = app_limiter().policy.orgs.get(name)
    if org is None:
        _fail(f"no org {name!r} under [orgs]", 2)
    return org


@limits_cli.command("show")
@click.argument("user", required=False)
@_WHO
@_ORG
@_TAG
def show(user: str | None, anonymous: bool | None, org_name: str | None,
         tag_name: str | None) -> None:
    """Every layer of USER (and of their org), of --org ORG or of --tag TAG: limit,
    remaining, reset (charges nothing)."""
    limiter = app_limiter()
    _one_subject(user, org_name, tag_name)
    try:
        if tag_name is not None:
            decision = limiter.engine.peek_tag(_tag(tag_name))
            head = f"tag {tag_name} (every API key bearing it)"
        elif user is None:
            assert org_name is not None
            realm = BODY_USER if anonymous else KEY_USER
            decision = limiter.engine.peek_org(_org(org_name), realm)
            head = f"org {org_name} ({'/chat user_ids' if anonymous else 'API key users'})"
        else:
            key_plans = limiter.keys.plans_by_user(user)
            realm = limiter.realm_of_user(user, key_plans, anonymous)
            # The key's plan and this namespace's override, as requests are served.
            plan = limiter.plan_of_user(user, key_plans, realm)
            org = limiter.org_of_user(user)
            decision = limiter.engine.peek(user, plan, realm, org)
            who = "/chat user_id" if realm == BODY_USER else "API key user"
            head = f"user {user} ({who})  plan {plan.name}" + (f"  org {org.name}" if org else "")
    except StoreUnavailable as exc:
        _fail(f"the store is unreachable: {exc}", 2)
    click.echo(head)
    width = max([16, *(len(s.layer.name) + 2 for s in decision.states)])
    click.echo(f"{'layer':<{width}}{'limit':>12}{'remaining':>12}{'reset_s':>10}")
    for s in decision.states:
        click.echo(f"{s.layer.name:<{width}}{s.layer.limit:>12g}{s.remaining:>12}"
                   f"{math.ceil(s.reset):>10}")


@limits_cli.command("reset")
@click.argument("user", required=False)
@click.option("--layer", default=None, help="Only this layer (e.g. user, quota-day).")
@_WHO
@_ORG
@_TAG
def reset(user: str | None, layer: str | None, anonymous: bool | None,
          org_name: str | None, tag_name: str | None) -> None:
    """Forget USER's (or --org ORG's, --tag TAG's) usage, in every layer or one. A user's
    reset leaves their org's and tags' layers alone: others share them."""
    limiter = app_limiter()
    _one_subject(user, org_name, tag_name)
    if tag_name is not None:
        _reset_tag(tag_name, layer)
        return
    if user is None:
        assert org_name is not None
        org = _org(org_name)
        names = [lay.name for lay in compile_org(org, llm=True).layers]
        if layer is not None and layer not in names \
                and layer not in [n.partition("/")[2] for n in names]:
            _fail(f"no layer {layer!r} for this org; layers: {', '.join(names)}", 2)
        try:
            removed = limiter.engine.reset_org(org, layer,
                                               BODY_USER if anonymous else KEY_USER)
        except StoreUnavailable as exc:
            _fail(f"the store is unreachable: {exc}", 2)
        _forgotten()
        click.echo(f"reset org {org_name}: {removed} key(s) removed")
        return
    try:
        key_plans = limiter.keys.plans_by_user(user)
        realm = limiter.realm_of_user(user, key_plans, anonymous)
        plan = limiter.plan_of_user(user, key_plans, realm)   # that namespace's, as served
    except StoreUnavailable as exc:
        _fail(f"the store is unreachable: {exc}", 2)
    names = [lay.name for lay in compile_plan(plan, llm=True).layers]
    if layer is not None and layer not in names:
        _fail(f"no layer {layer!r} for this user; layers: {', '.join(names)}", 2)
    try:
        removed = limiter.engine.reset(user, layer, plan, realm)
    except StoreUnavailable as exc:
        _fail(f"the store is unreachable: {exc}", 2)
    _forgotten()
    audit_shell("limits.reset", f"{realm}:{user}", {"layer": layer or "all", "plan": plan.name},
                {"keys_removed": removed})
    click.echo(f"reset {user}: {removed} key(s) removed")


def _reset_tag(name: str, layer: str | None) -> None:
    tag = _tag(name)
    names = [lay.name for lay in compile_org(tag, llm=True, tag=True).layers]
    if layer is not None and layer not in names \
            and layer not in [n.partition("/")[2] for n in names]:
        _fail(f"no layer {layer!r} for this tag; layers: {', '.join(names)}", 2)
    try:
        removed = app_limiter().engine.reset_tag(tag, layer)
    except StoreUnavailable as exc:
        _fail(f"the store is unreachable: {exc}", 2)
    _forgotten()
    audit_shell("limits.reset", f"tag:{name}", {"layer": layer or "all"},
                {"keys_removed": removed})
    click.echo(f"reset tag {name}: {removed} key(s) removed")


@limits_cli.command("check-config")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def check_config(path: Path) -> None:
    """Validate a policy file without starting anything."""
    try:
        policy = load_policy(path)
        if policy.routes:   # endpoints exist only in the app: checked against the one loaded
            unknown_endpoints(str(path), policy.routes, set(current_app.view_functions))
    except PolicyError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    orgs = f", {len(policy.orgs)} orgs" if policy.orgs else ""
    click.echo(f"{path}: ok ({len(policy.plans)} plans{orgs}, {len(policy.models)} models)")


_NAMESPACES = {KEY_USER: "key", BODY_USER: "chat"}


def _table() -> OverrideTable:
    return OverrideTable(app_limiter().store)


def _seen_here() -> None:
    """This process's own limiter (tests, `flask shell`) sees the change now, not in 1 s."""
    overrides = app_limiter().policy.overrides
    if isinstance(overrides, StoreOverrides):
        overrides.refresh(force=True)


def _forgotten() -> None:
    """Usage was forgotten: every worker's deny cache (limiting/deny.py) stops answering
    within a second, this process's at once."""
    try:
        table = _table()
    except TypeError:   # a store of another kind keeps no overrides, nor a deny epoch
        return
    _guarded(table.bump_deny)
    _seen_here()


def _when(at: float | None) -> str:
    if at is None:
        return "until cleared"
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@limits_cli.command("set")
@click.argument("user")
@click.option("--plan", default=None, help="Serve USER on this plan (one under [plans]).")
@click.option("--quota", "quotas", multiple=True, metavar='"N per unit"',
              help="A quota for USER; it replaces the plan's quota of the same window and "
                   "keeps its usage. Repeatable.")
@click.option("--budget-usd-per-day", "budget", type=float, default=None,
              help="USER's dollar budget per sliding day.")
@click.option("--for", "duration", default=None, metavar="DURATION",
              help="How long, e.g. 30m, 12h, 7d (default: until cleared).")
@_WHO
def set_override(user: str, plan: str | None, quotas: tuple[str, ...], budget: float | None,
                 duration: str | None, anonymous: bool | None) -> None:
    """Change USER's limits now, without a restart: every worker within a second."""
    limiter = app_limiter()
    try:
        seconds = parse_duration(duration) if duration is not None else None
        override = Override(plan=plan, quotas=quotas, budget_usd_per_day=budget)
        check(override, limiter.policy)
    except ValueError as exc:
        _fail(str(exc), 2)
    realm = _guarded(lambda: limiter.realm_of_user(user, anonymous=anonymous))
    table = _table()
    now = _guarded(table.now)
    override = Override(plan=plan, quotas=quotas, budget_usd_per_day=budget, set_at=now,
                        expires_at=None if seconds is None else now + seconds)
    before = _guarded(table.load)[2].get((realm, user))
    _guarded(lambda: table.put(realm, user, override))
    audit_shell("limits.set", f"{realm}:{user}", before and before.what(), override.what())
    _seen_here()
    click.echo(f"override for {user} ({_NAMESPACES[realm]}): {override.what()}  "
               f"{'until ' if seconds else ''}{_when(override.expires_at)}; every worker "
               f"applies it within {REFRESH_SECONDS:g} s")


@limits_cli.command("overrides")
@click.option("--clear", "clear", default=None, metavar="USER", help="Remove USER's override.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array, for scripts.")
@_WHO
def list_overrides(clear: str | None, as_json: bool, anonymous: bool | None) -> None:
    """Every override in force: user, namespace, what, set when, expires when."""
    if clear is not None:
        _clear(clear, anonymous)
        return
    _, now, records = _guarded(_table().load)
    rows = [{"user": user, "namespace": _NAMESPACES.get(realm, realm), "what": o.what(),
             "set_at": _when(o.set_at), "expires_at": _when(o.expires_at)}
            for (realm, user), o in sorted(records.items(), key=lambda kv: kv[0][::-1])
            if o.expires_at is None or o.expires_at > now]
    if as_json:
        click.echo(json.dumps(rows))
        return
    header = {"user": "user", "namespace": "namespace", "what": "what", "set_at": "set",
              "expires_at": "expires"}
    widths = {k: max(len(str(row[k])) for row in [header, *rows]) for k in header}
    for row in [header, *rows]:
        click.echo("  ".join(str(row[k]).ljust(widths[k]) for k in header).rstrip())
    if not rows:
        click.echo("(no overrides)")


@limits_cli.command("unset")
@click.argument("user")
@_WHO
def unset(user: str, anonymous: bool | None) -> None:
    """Remove USER's override (both namespaces unless one is named): the plan applies again."""
    _clear(user, anonymous)


def _clear(user: str, anonymous: bool | None) -> None:
    realms = [KEY_USER, BODY_USER] if anonymous is None else \
        [BODY_USER if anonymous else KEY_USER]
    table = _table()
    records = _guarded(table.load)[2]
    removed = []
    for realm in realms:
        if _guarded(lambda realm=realm: table.remove(realm, user)):   # type: ignore[misc]
            before = records.get((realm, user))
            audit_shell("limits.unset", f"{realm}:{user}", before and before.what(), None)
            removed.append(_NAMESPACES[realm])
    if not removed:
        _fail(f"no override for {user}", 1)
    _seen_here()
    click.echo(f"cleared the override of {user} ({', '.join(removed)}); every worker applies "
               f"its plan again within {REFRESH_SECONDS:g} s")
