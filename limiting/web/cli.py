"""`flask --app app limits ...`: look at and reset a user's layers from the shell."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click
from flask import current_app
from flask.cli import AppGroup

from ..core.layers import compile_plan
from ..core.naming import BODY_USER
from ..core.policy import PolicyError, load_policy
from ..core.routes import unknown_endpoints
from ..stores.store import StoreUnavailable
from .operated import app_limiter

limits_cli = AppGroup("limits", help="Inspect and reset rate limits.")


_WHO = click.option(
    "--anonymous/--key-user", "anonymous", default=None,
    help="The /chat body user_id USER, or the API key user USER (default: the key user when "
         "USER holds a live key, else the /chat user_id): the two never share limits.")


@limits_cli.command("show")
@click.argument("user")
@_WHO
def show(user: str, anonymous: bool | None) -> None:
    """Every layer of USER: limit, remaining, reset (charges nothing)."""
    limiter = app_limiter()
    try:
        plan = limiter.plan_of_user(user)   # the key's plan, as requests are served
        realm = limiter.realm_of_user(user, anonymous=anonymous)
        decision = limiter.engine.peek(user, plan, realm)
    except StoreUnavailable as exc:
        click.echo(f"error: the store is unreachable: {exc}", err=True)
        sys.exit(2)
    who = "/chat user_id" if realm == BODY_USER else "API key user"
    click.echo(f"user {user} ({who})  plan {plan.name}")
    click.echo(f"{'layer':<16}{'limit':>12}{'remaining':>12}{'reset_s':>10}")
    for s in decision.states:
        click.echo(f"{s.layer.name:<16}{s.layer.limit:>12g}{s.remaining:>12}"
                   f"{math.ceil(s.reset):>10}")


@limits_cli.command("reset")
@click.argument("user")
@click.option("--layer", default=None, help="Only this layer (e.g. user, quota-day).")
@_WHO
def reset(user: str, layer: str | None, anonymous: bool | None) -> None:
    """Forget USER's usage, in every layer or one."""
    limiter = app_limiter()
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
        if policy.routes:   # endpoints exist only in the app: checked against the one loaded
            unknown_endpoints(str(path), policy.routes, set(current_app.view_functions))
    except PolicyError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"{path}: ok ({len(policy.plans)} plans, {len(policy.models)} models)")



