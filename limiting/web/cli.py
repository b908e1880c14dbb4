"""`flask --app app limits ...`: look at and reset a user's layers from the shell."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import NoReturn

import click
from flask.cli import AppGroup

from ..core.layers import compile_plan
from ..core.naming import BODY_USER, KEY_USER
from ..core.orgs import compile_org
from ..core.policy import Plan, PolicyError, load_policy
from ..stores.store import StoreUnavailable
from .operated import app_limiter

limits_cli = AppGroup("limits", help="Inspect and reset rate limits.")


_WHO = click.option(
    "--anonymous/--key-user", "anonymous", default=None,
    help="The /chat body user_id USER, or the API key user USER (default: the key user when "
         "USER holds a live key, else the /chat user_id): the two never share limits.")


_ORG = click.option("--org", "org_name", default=None,
                    help="An org under [orgs] (its key holders' layers; with --anonymous its "
                         "/chat user_ids').")


def _org(name: str) -> Plan:
    org = app_limiter().policy.orgs.get(name)
    if org is None:
        _fail(f"no org {name!r} under [orgs]")
    return org


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@limits_cli.command("show")
@click.argument("user", required=False)
@_WHO
@_ORG
def show(user: str | None, anonymous: bool | None, org_name: str | None) -> None:
    """Every layer of USER (and of their org), or of --org ORG: limit, remaining, reset
    (charges nothing)."""
    limiter = app_limiter()
    if (user is None) == (org_name is None):
        _fail("name a USER or an --org (not both)")
    try:
        if user is None:
            assert org_name is not None
            realm = BODY_USER if anonymous else KEY_USER
            decision = limiter.engine.peek_org(_org(org_name), realm)
            head = f"org {org_name} ({'/chat user_ids' if anonymous else 'API key users'})"
        else:
            plan = limiter.plan_of_user(user)   # the key's plan, as requests are served
            org = limiter.org_of_user(user)
            realm = limiter.realm_of_user(user, anonymous=anonymous)
            decision = limiter.engine.peek(user, plan, realm, org)
            who = "/chat user_id" if realm == BODY_USER else "API key user"
            head = f"user {user} ({who})  plan {plan.name}" + (f"  org {org.name}" if org else "")
    except StoreUnavailable as exc:
        _fail(f"the store is unreachable: {exc}")
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
def reset(user: str | None, layer: str | None, anonymous: bool | None,
          org_name: str | None) -> None:
    """Forget USER's (or --org ORG's) usage, in every layer or one. A user's reset leaves
    their org's layers alone: the other members share them."""
    limiter = app_limiter()
    if (user is None) == (org_name is None):
        _fail("name a USER or an --org (not both)")
    if user is None:
        assert org_name is not None
        org = _org(org_name)
        names = [lay.name for lay in compile_org(org, llm=True).layers]
        if layer is not None and layer not in names \
                and layer not in [n.partition("/")[2] for n in names]:
            _fail(f"no layer {layer!r} for this org; layers: {', '.join(names)}")
        try:
            removed = limiter.engine.reset_org(org, layer,
                                               BODY_USER if anonymous else KEY_USER)
        except StoreUnavailable as exc:
            _fail(f"the store is unreachable: {exc}")
        click.echo(f"reset org {org_name}: {removed} key(s) removed")
        return
    try:
        plan = limiter.plan_of_user(user)
        realm = limiter.realm_of_user(user, anonymous=anonymous)
    except StoreUnavailable as exc:
        click.echo(f"error: the store is unreachable: {exc}", err=True)
        sys.exit(2)
    names = [lay.name for lay in compile_plan(plan, llm=True).layers]
    if layer is not None and layer not in names:
        click.echo(f"error: no layer {layer!r} for this user; layers: {', '.join(names)}",
                   err=True)
        sys.exit(2)
    try:
        removed = limiter.engine.reset(user, layer, plan, realm)
    except StoreUnavailable as exc:
        click.echo(f"error: the store is unreachable: {exc}", err=True)
        sys.exit(2)
    click.echo(f"reset {user}: {removed} key(s) removed")


@limits_cli.command("check-config")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def check_config(path: Path) -> None:
    """Validate a policy file without starting anything."""
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    orgs = f", {len(policy.orgs)} orgs" if policy.orgs else ""
    click.echo(f"{path}: ok ({len(policy.plans)} plans{orgs}, {len(policy.models)} models)")



