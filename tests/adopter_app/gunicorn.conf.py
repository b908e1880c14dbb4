"""The adopting app's own gunicorn config: its settings, plus the limiter's settings and hooks.
gunicorn reads this file when started in this folder without -c."""

from pathlib import Path
from typing import Any

import limiting.gunicorn
from limiting.gunicorn import *  # noqa: F403  (bind, workers, hooks, ...)

workers = 2
proc_name = "adopter"


def on_starting(server: Any) -> None:
    """A hook of the app's own: the limiter's first, then its own work."""
    limiting.gunicorn.on_starting(server)
    Path("started-by-own-config").write_text(str(workers))
