"""The shell commands' side of the audit trail (limiting/audit.py): who ran a change."""

from __future__ import annotations

import click

from ..audit import record, shell_actor
from ..stores.store import StoreUnavailable
from .operated import app_limiter


def audit_shell(action: str, subject: str, before: object = None, after: object = None
                ) -> None:
    """Record a shell command's change as the shell user; a store that is away by now
    leaves the change done and says it went unaudited."""
    limiter = app_limiter()
    try:
        record(limiter.store, shell_actor(), action, subject, before, after,
               namespace=limiter.engine.namespace)
    except StoreUnavailable as exc:
        click.echo(f"warning: done, but not written to the audit trail: {exc}", err=True)
