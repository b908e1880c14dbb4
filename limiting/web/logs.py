"""Structured JSON logs for refusals and fail-policy decisions: who, which layer, how long
to wait, which request. Never API keys, prompts or upstream credentials."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from flask import has_request_context, request

from .context import request_limits

log = logging.getLogger("limiter.decisions")


def request_id() -> str:
    """The caller's X-Request-ID when it looks sane, else one of ours; echoed on the answer."""
    if not has_request_context():
        return "-"
    limits = request_limits()
    rid = limits.request_id
    if rid is None:
        given = request.headers.get("X-Request-ID", "")
        rid = given if 0 < len(given) <= 128 and given.isprintable() else uuid.uuid4().hex
        limits.request_id = rid
    return rid


def event(name: str, **fields: Any) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(name, extra={"event": {"event": name, "request_id": request_id(), **fields}})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: the record's ``event`` fields, or its message."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {"ts": round(time.time(), 3), "level": record.levelname.lower(),
                                "logger": record.name}
        fields = getattr(record, "event", None)
        if isinstance(fields, dict):
            body.update(fields)
        else:
            body["message"] = record.getMessage()
        if record.exc_info and record.exc_info[0] is not None:
            body["error"] = record.exc_info[0].__name__
            body["traceback"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


def configure(level: int = logging.INFO) -> None:
    """JSON lines on stderr for the limiter's loggers, unless the app configured them."""
    root = logging.getLogger("limiter")
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
