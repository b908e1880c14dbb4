"""`flask --app app alerts test`: send one signed test event to ``[alerts] webhook_url``, so
an operator sees the receiver and its signature check work before a real alert needs them.

Exit codes as the other commands: 0 delivered (2xx), 1 the receiver refused or was
unreachable, 2 no webhook configured.
"""

from __future__ import annotations

import secrets
import sys
import time

import click
from flask import current_app
from flask.cli import AppGroup

from ..alerts import post_json
from ..core.alerting import SIGNATURE_HEADER, body_of, signature
from .configured import setting
from .operated import app_limiter

alerts_cli = AppGroup("alerts", help="Alerts before the wall: webhook checks.")


def webhook_secret() -> str | None:
    """ALERT_WEBHOOK_SECRET from the app's config, else the environment."""
    return setting(current_app, "ALERT_WEBHOOK_SECRET") or None


@alerts_cli.command("test")
@click.option("--url", help="Send here instead of the policy's [alerts] webhook_url.")
def test_event(url: str | None) -> None:
    """POST a signed event of type "limit.test" and say what the receiver answered."""
    target = url or app_limiter().policy.alert_webhook_url
    if not target:
        click.echo("no [alerts] webhook_url in the policy (or give --url)", err=True)
        sys.exit(2)
    now = int(time.time())
    event = {"id": "evt_test_" + secrets.token_hex(8), "type": "limit.test",
             "subject": "test", "realm": "user", "layer": "test", "threshold": 1.0,
             "used": 0, "limit": 0, "resets_at": now, "created": now}
    body = body_of(event)
    secret = webhook_secret()
    headers = {SIGNATURE_HEADER: signature(body, secret, now)} if secret else {}
    try:
        status = post_json(target, body, headers)
    except OSError as exc:
        click.echo(f"{event['id']}: {target} unreachable: {exc}", err=True)
        sys.exit(1)
    signed = "signed" if secret else "UNSIGNED (set ALERT_WEBHOOK_SECRET)"
    click.echo(f"{event['id']}: {target} answered {status} ({signed})")
    if not 200 <= status < 300:
        sys.exit(1)
