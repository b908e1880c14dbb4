"""Relaying a provider's stream as text/event-stream, charged by the reservation rule however
the stream ends."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping

from flask import Response, stream_with_context

from limiting.providers.llm_calls import Tally
from limiting.reservation import Reservation

from .problems import ApiProblem, problem_from

log = logging.getLogger("limiter.v1")


def sse_response(relay: Iterator[str], tally: Tally, reservation: Reservation,
                 close_upstream: Callable[[], None],
                 error_event: Callable[[ApiProblem], str], headers: Mapping[str, str]
                 ) -> Response:
    """Stream ``relay`` as text/event-stream. However it ends (done, upstream error, client
    gone, never started) the request was sent, so it is charged: the provider's final usage
    when it came, else as reserved (``Tally.charge``); the reservation finishes once."""

    def finish() -> None:
        if reservation.done:
            return
        try:
            close_upstream()
        except Exception:
            log.debug("closing the upstream stream failed", exc_info=True)
        # Reservation logs and survives a store error itself; the lease then ages out.
        tally.charge(reservation)

    def run() -> Iterator[str]:
        # Settle before the last event goes out, so a client that has read the whole stream
        # already sees its real usage in the next request's headers.
        try:
            for text in relay:
                if tally.complete or tally.failed:
                    finish()
                yield text
        except Exception as exc:   # after the first byte, errors travel as an SSE event
            tally.failed = True
            finish()
            yield error_event(problem_from(exc))
        finally:            # GeneratorExit (client gone) lands here too
            finish()

    response = Response(stream_with_context(run()), mimetype="text/event-stream")
    response.headers.update(headers)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    response.call_on_close(finish)   # a generator closed before its first step runs no finally
    return response
