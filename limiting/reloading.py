"""``kill -HUP`` on the gunicorn master: the policy file checked before any worker reads it.

gunicorn answers HUP by starting new workers (which load the app, and so the policy) and then
stopping the old ones gracefully; a worker that cannot load the app would stop the master.
So the master checks the file first and the workers never read the operator's file itself:
they read the copy the master last accepted (``<instance>/limits.last-good.toml``, written
whole and renamed into place). A bad file is refused with its reason logged, and the new
workers load the last good copy: the old policy keeps serving, with no failed request.

Standard library (and the sans-io core) only: this runs in the master before gevent patches.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
import uuid
from pathlib import Path

from .core.policy import PolicyError, parse_policy
from .overrides import changed

KEPT = "limits.last-good.toml"
# The master has no store client (it must not open sockets before gevent patches); each
# reload is written here, and the workers it starts put it in the audit trail, once.
RELOADS = "limits.reloads.jsonl"
KEEP_RELOADS = 20


def check(source: Path) -> bytes:
    """The file's bytes if it is a good policy; PolicyError with file, key and reason else."""
    try:
        data = source.read_bytes()
        parse_policy(tomllib.loads(data.decode("utf-8")), str(source))
    except FileNotFoundError:
        raise PolicyError(f"{source}: (file): not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{source}: (syntax): {exc}") from None
    return data


def keep(source: Path, folder: Path, reloading: bool) -> tuple[Path | None, str]:
    """Check ``source``; if good, make it the copy workers load. Returns the copy's path
    (None: nothing was ever accepted) and what happened, for the master's log."""
    kept = folder / KEPT
    try:
        data = check(source)
    except PolicyError as exc:
        if reloading:
            changed("reload_refused", None, _digest(kept), str(exc))
            _note(folder, "policy.reload_refused", _digest(kept), str(exc))
        return (kept if kept.exists() else None), f"refused: {exc}"
    before = _digest(kept)
    folder.mkdir(parents=True, exist_ok=True)
    part = kept.with_suffix(f".{os.getpid()}.part")
    part.write_bytes(data)
    os.replace(part, kept)   # whole or not at all: a booting worker never reads half a file
    if reloading:
        changed("reload_accepted", None, before, _digest(kept))
        _note(folder, "policy.reload_accepted", before, _digest(kept))
    return kept, f"accepted {source}"


def _note(folder: Path, action: str, before: str | None, after: str | None) -> None:
    """Append one reload to RELOADS (the newest KEEP_RELOADS kept) for the audit trail."""
    path = folder / RELOADS
    event = {"id": uuid.uuid4().hex, "action": action, "actor": f"signal:HUP:{os.getpid()}",
             "before": before, "after": after}
    try:
        lines = path.read_text().splitlines()[-(KEEP_RELOADS - 1):]
    except FileNotFoundError:
        lines = []
    folder.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(f".{os.getpid()}.part")
    part.write_text("\n".join([*lines, json.dumps(event)]) + "\n")
    os.replace(part, path)


def noted_reloads(folder: Path) -> list[dict[str, str | None]]:
    """The reloads the master noted, oldest first (a torn or foreign line is skipped)."""
    try:
        lines = (folder / RELOADS).read_text().splitlines()
    except OSError:
        return []
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("id"), str):
            events.append(event)
    return events


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except FileNotFoundError:
        return None
