"""Structured JSON logs for refusals and fail-policy decisions: who, which layer, how long
to wait, which request. Never API keys, prompts or upstream credentials.

Refusals are aggregated (:class:`Refusals`): a subject's first refusal is one line at once,
with its request id; after that, one line per subject and layer every ``AGGREGATE_SECONDS``
with the count, so a client hammering at thousands of requests a second writes a line every
ten seconds, not thousands.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
from typing import Any

from flask import has_request_context, request

from ..core.flushing import Flusher
from .context import request_limits

log = logging.getLogger("limiter.decisions")


def request_id() -> str:
    """The caller's X-Request-ID when it looks sane, else one of ours; echoed on the answer."""
    if not has_request_context():
        return "-"
    limits = request_limits()
    rid = limits.request_id
    if rid is None:
        rid = limits.request_id = request_id_for(request.headers.get("X-Request-ID", ""))
    return rid


def request_id_for(given: str) -> str:
    """``given`` (the caller's X-Request-ID) when it looks sane, else a new one."""
    return given if 0 < len(given) <= 128 and given.isprintable() else os.urandom(16).hex()


def event(name: str, **fields: Any) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(name, extra={"event": {"event": name, "request_id": request_id(), **fields}})


AGGREGATE_SECONDS = 10.0
# Subjects counted at once; more (an attack from many addresses) writes the lines early.
MAX_SUBJECTS = 10_000

Subject = tuple[str, str, str]   # ("user" or "ip", who, layer)


class Refusals:
    """Refusal lines for one process: the first of a subject at once, then counts."""

    def __init__(self, interval: float = AGGREGATE_SECONDS, max_subjects: int = MAX_SUBJECTS
                 ) -> None:
        self.interval = interval
        self.max_subjects = max_subjects
        self._lock = threading.Lock()
        # subject -> [refusals since its last line, the last retry_after]
        self._counts: dict[Subject, list[Any]] = {}
        self._due = time.monotonic() + interval
        # Counts reach the log within an interval even when the refusals stop; it keeps
        # flushing while subjects are counted, so one with none in an interval is forgotten.
        self._flusher = Flusher("refusal-log", interval, self.flush,
                                busy=lambda: bool(self._counts))

    def refused(self, kind: str, who: str, layer: str, retry_after: int | None) -> None:
        """One refusal of ``who`` (a user id, or an IP for the edge) by ``layer``."""
        now = time.monotonic()
        if now >= self._due:
            self.flush()
        subject = (kind, who, layer)
        with self._lock:
            found = self._counts.get(subject)
            if found is not None:
                found[0] += 1
                found[1] = retry_after
                return
            full = len(self._counts) >= self.max_subjects
            self._counts[subject] = [0, retry_after]
        if full:
            self.flush()
        self._flusher.wake()
        event("refused", **{kind: who}, layer=layer, retry_after=retry_after, count=1)

    def flush(self) -> None:
        """One line per subject refused since its last line, with the count. A subject with
        none in a whole interval is forgotten: its next refusal is logged at once again."""
        with self._lock:
            self._due = time.monotonic() + self.interval
            counts = self._counts
            self._counts = {s: [0, c[1]] for s, c in counts.items()
                            if c[0] and len(counts) < self.max_subjects}
        if not log.isEnabledFor(logging.INFO):
            return
        for (kind, who, layer), (count, retry_after) in counts.items():
            if count:
                fields = {"event": "refused", kind: who, "layer": layer,
                          "retry_after": retry_after, "count": count,
                          "interval_s": self.interval}
                log.info("refused", extra={"event": fields})


refusals = Refusals()


def _last_counts() -> None:
    """A worker's last counts at its exit; its log stream may be gone by then (say nothing)."""
    raising, logging.raiseExceptions = logging.raiseExceptions, False
    try:
        refusals.flush()
    finally:
        logging.raiseExceptions = raising


atexit.register(_last_counts)


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
