"""Spans for the limiter's steps (``limiter.decide``, ``limiter.upstream``,
``limiter.settle``) when OpenTelemetry is there to take them.

With ``opentelemetry-api`` installed and a tracer provider configured, each step is a span
in the request's trace. Without the package, or with no provider configured (the API's
proxy/no-op provider), :func:`span` hands back one shared do-nothing context: a request pays
a global lookup and an ``isinstance``, not a span.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

try:
    from opentelemetry import trace as _trace
except ImportError:   # the extra is not installed: no spans, no cost
    _trace = None  # type: ignore[assignment]

_NOTHING: AbstractContextManager[None] = nullcontext()
_UNSET: tuple[type, ...] = ()
if _trace is not None:
    _UNSET = (_trace.ProxyTracerProvider, _trace.NoOpTracerProvider)

Attributes = Mapping[str, str | int | float | bool]


def tracing() -> bool:
    """Is a real tracer provider configured (so spans go somewhere)?"""
    return _trace is not None and not isinstance(_trace.get_tracer_provider(), _UNSET)


def span(name: str, attributes: Attributes | None = None
         ) -> AbstractContextManager[Any]:
    """A span named ``name`` around a step, or nothing when no one traces."""
    if not tracing():
        return _NOTHING
    return _span(name, attributes or {})


@contextmanager
def _span(name: str, attributes: Attributes) -> Iterator[Any]:
    tracer = _trace.get_tracer("flask-llm-limiter")
    with tracer.start_as_current_span(name, attributes=dict(attributes)) as current:
        yield current


def annotate(current: Any, attributes: Attributes) -> None:
    """Add what was learnt inside the step (the refusing layer, the wait) to its span."""
    if current is not None:
        current.set_attributes(dict(attributes))
